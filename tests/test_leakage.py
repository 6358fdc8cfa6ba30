"""What an update leaks (federation/leakage.py) and its benchmark's refusals: the measures on
images and scores worked out by hand, the inversion on a tiny fixed case (one real digit,
a briefly trained CNN), the membership attack against DP noise on a tiny federation."""

import math
import subprocess
import sys

import jax
import numpy as np
import pytest

import model
from federation import leakage, shards, simulation
from federation.server_setup import ServerSettings
from helpers import ENV, REPO


def test_psnr_ssim_auc_and_tpr_on_hand_made_cases():
    image = np.zeros((28, 28), np.float32)
    image[8:20, 12:16] = 1.0  # a bar
    assert leakage.psnr(image, image) == math.inf
    assert leakage.psnr(np.zeros((28, 28)), np.full((28, 28), 0.1)) == pytest.approx(20.0, rel=1e-5)
    assert leakage.ssim(image, image) == pytest.approx(1.0, abs=1e-6)
    assert leakage.ssim(image, 1.0 - image) < 0  # the negative: anti-correlated structure
    low, high = np.arange(10.0), np.arange(10.0) + 100
    assert leakage.auc(high, low) == 1.0 and leakage.auc(low, high) == 0.0
    assert leakage.auc(low, low) == 0.5  # ties count half
    # 100 non-members 0..99: at 1% FPR the threshold is 98 (only 99 passes), so of the
    # members 50, 98.5, 99.5 and 120 all but 50 are caught.
    assert leakage.tpr_at_fpr(np.array([50, 98.5, 99.5, 120]), np.arange(100.0)) == 0.75


@pytest.fixture(scope="module")
def digits(data_dir):
    """Real digits: the shards and test set of conftest's data_dir."""
    return shards.load_all(data_dir)


def test_inversion_rebuilds_one_image_but_not_one_from_a_secagg_sum(digits):
    parts, _ = digits
    # The server's model: one epoch on 256 digits of another client (at initialisation the
    # output layer is zero, and the earlier layers' gradients with it).
    params, _ = model.train(model.init_params(jax.random.key(0)), parts[1].x_train[:256],
                            parts[1].y_train[:256], epochs=1, batch_size=32,
                            learning_rate=4e-3, key=jax.random.key(1))
    x = parts[0].x_train[:10].astype(np.float32) / 255.0  # (10, 28, 28)
    y = parts[0].y_train[:10]
    options = {"steps": 200, "restarts": 1}
    plain = leakage.sgd_update(params, x[:1], y[:1])
    assert leakage.infer_label(plain) == y[0]  # iDLG: the label from the update's sign
    rebuilt = leakage.invert(params, plain, [y[0]], jax.random.key(2), **options)
    # SecAgg+: the server sees only the sum of 10 one-image updates; any of the 10 counts.
    total = leakage.add([leakage.sgd_update(params, x[k:k + 1], y[k:k + 1])
                         for k in range(10)])
    from_sum = leakage.invert(params, total, [leakage.infer_label(total)], jax.random.key(2),
                              **options)
    _, psnr_sum, ssim_sum = leakage.best_match(from_sum[0], x)
    # Measured: 11.4 dB and SSIM 0.6 from the plain update, 5.3 dB and 0.1 from the sum
    # (the image of a blank page scores about 7 dB).
    assert leakage.psnr(rebuilt[0], x[0]) > psnr_sum + 4.0
    assert leakage.ssim(rebuilt[0], x[0]) > ssim_sum + 0.2


def test_membership_auc_falls_with_the_noise(digits):
    parts, test = digits
    # Two clients of 32 digits, 10 local epochs, 2 rounds: a model that remembers them.
    tiny = [shards.Partition(p.x_train[:32], p.y_train[:32], p.x_val[:1], p.y_val[:1])
            for p in parts[:2]]
    members = (np.concatenate([p.x_train for p in tiny]),
               np.concatenate([p.y_train for p in tiny]))
    nonmembers = test[0][:256], test[1][:256]
    aucs = []
    for sigma in (None, 0.1, 1.0):
        dp = {} if sigma is None else {"dp_noise_multiplier": sigma, "dp_clipping_norm": 5.0}
        settings = ServerSettings(rounds=2, min_clients=2, local_epochs=10, seed=0, **dp)
        result = simulation.run(settings, tiny, test, federated_evaluation=False)
        aucs.append(leakage.membership(model.ndarrays_to_params(result.arrays), members,
                                       nonmembers)["auc"])
    # Measured: 0.77 without DP, 0.58 at σ = 0.1, 0.54 at σ = 1.
    assert aucs[0] > 0.7 and aucs[1] < aucs[0] - 0.1 and aucs[2] < aucs[1]


BENCH = [sys.executable, str(REPO / "benchmarks" / "bench_leakage.py")]


def test_bench_refuses_bad_input_in_one_line(data_dir, tmp_path):
    """The benchmark as a user runs it: each refusal is one line and a non-zero exit,
    before anything runs or is written (the processes start together)."""
    out = tmp_path / "grid.png"
    cases = [  # (arguments, exit status, the end of the one line on stderr)
        (["invert", "--data-dir", "D", "--sigma", "-0.5"], 2,
         "argument --sigma: must be >= 0, got -0.5"),
        (["membership", "--data-dir", "D", "--sigma", "1", "-1"], 2,
         "argument --sigma: must be >= 0, got -1.0"),
        (["membership", "--data-dir", "D", "--accountant", "moments"], 2,
         "argument --accountant: invalid choice: 'moments' (choose from 'pld', 'rdp')"),
        (["invert", "--data-dir", str(data_dir), "--image", "5000", "--out", str(out)], 1,
         None),
    ]
    procs = [subprocess.Popen(BENCH + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV, cwd=tmp_path) for argv, _, _ in cases]
    for proc, (argv, status, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, (argv, err)
        assert "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        if message is not None:
            assert line.endswith(message), (argv, err)
        else:  # the image outside the shard: named in one line, nothing drawn
            assert line.startswith("bench_leakage.py: error: --image 5000 is outside "
                                   "partition 0's shard"), err
            assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
