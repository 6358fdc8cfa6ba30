"""What protection costs and what it buys: poisoning attacks against the aggregation rules,
and DP-FedAvg's accuracy for a privacy budget. Prints the tables of README Part 5.

It runs the federation in one process, federation/simulation.py, which computes what the
server and the clients compute: attackers run client.py's --attack code, the clients of a
round are picked as TimeoutClientManager picks them, and the new global model comes from
the strategy's own aggregation (a rule, or DP-FedAvg with its seeded noise).
tests/test_protection.py checks that a DP run and a median run with a sign-flip attacker
over gRPC give these bits; tests/test_federation.py does the same for FedAvg. What it
leaves out is the processes and the network, so it runs 1,000 clients on a laptop.

    python partition_data.py --source idx --dataset fashion_mnist \\
        --idx-dir /usr/share/datasets/fashion-mnist --out-dir /tmp/fmnist
    python benchmarks/bench_protection.py attacks --data-dir /tmp/fmnist --json /tmp/a.jsonl
    python benchmarks/bench_protection.py plot --json /tmp/a.jsonl --out docs/attacks.png
    python benchmarks/bench_protection.py dp --data-dir /tmp/fmnist --sigma 0 0.5 1 2
    python partition_data.py --source idx --dataset fashion_mnist --num-partitions 1000 \\
        --idx-dir /usr/share/datasets/fashion-mnist --out-dir /tmp/fmnist1000
    python benchmarks/bench_protection.py dp --data-dir /tmp/fmnist1000 \\
        --fraction-fit 0.01 0.1 --sigma 0.5 1 --rounds 50

Attackers are the highest-numbered partitions (9, 8, 7 of 10). Every run starts from the
same initial model (--seed) and uses model.py's local-training defaults.
"""

import argparse
import json
import logging
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from federation import privacy, shards, simulation  # noqa: E402  (on sys.path only now)
from federation.aggregation import RULES  # noqa: E402
from federation.server_setup import ServerSettings  # noqa: E402


def federate(parts: list[shards.Partition], test_set: tuple, *, rounds: int,
             fraction_fit: float = 1.0, rule: str = "fedavg", trim_fraction: float = 0.2,
             krum_malicious: int = 2, dp: privacy.DPConfig | None = None,
             attack: str | None = None, attackers: int = 0, boost: float = 10.0,
             seed: int = 0) -> list[dict]:
    """One run (model.py's local-training defaults); a record per round: test accuracy,
    seconds, ε (with DP)."""
    n = len(parts)
    evil = set(range(n - attackers, n))
    settings = ServerSettings(
        rounds=rounds, min_clients=n, fraction_fit=fraction_fit, seed=seed, aggregation=rule,
        trim_fraction=trim_fraction, krum_malicious=krum_malicious,
        **({} if dp is None else {"dp_noise_multiplier": dp.noise_multiplier,
                                  "dp_clipping_norm": dp.clipping_norm, "dp_delta": dp.delta}))
    records = []

    def record(done: simulation.Round) -> None:
        if not done.record["round"]:
            return
        accuracy = done.record["centralized_accuracy"]
        records.append({"round": done.record["round"], "accuracy": accuracy,
                        "seconds": round(done.record["round_seconds"], 2),
                        "attackers_sampled": len(evil & set(done.sampled))})
        if dp is not None:
            records[-1].update(epsilon=done.record["epsilon"],
                               epsilon_rdp=done.record["epsilon_rdp"])
        print(f"  round {done.record['round']}: accuracy {100 * accuracy:.2f}%"
              + (f"  ε {done.record['epsilon']:.2f}" if dp is not None else ""), flush=True)

    simulation.run(settings, parts, test_set, attackers=dict.fromkeys(evil, attack),
                   attack_boost=boost, federated_evaluation=False, on_round=record)
    return records


def emit(row: dict, json_path: str | None) -> None:
    """Print a finished run's summary line; append it to --json."""
    print(json.dumps(row), flush=True)
    if json_path:
        with open(json_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def run_attacks(args: argparse.Namespace) -> None:
    """Every rule against every attack and number of attackers."""
    parts, test_set = shards.load_all(args.data_dir)
    table = {}
    cases = ([] if args.no_honest else [(None, 0)]) + [
        (a, k) for a in args.attack for k in args.attackers if k > 0]
    for attack, attackers in cases:
        for rule in args.rules:
            print(f"{rule}, {attackers} x {attack or 'honest'}", flush=True)
            records = federate(parts, test_set, rounds=args.rounds, rule=rule,
                               trim_fraction=args.trim_fraction,
                               krum_malicious=args.krum_malicious, attack=attack,
                               attackers=attackers, boost=args.boost, seed=args.seed)
            table[attack, attackers, rule] = records[-1]["accuracy"]
            emit({"bench": "attacks", "data_dir": args.data_dir, "rule": rule,
                  "attack": attack, "attackers": attackers, "clients": len(parts),
                  "trim_fraction": args.trim_fraction, "krum_malicious": args.krum_malicious,
                  "boost": args.boost, "rounds": records}, args.json)
    print(f"\naccuracy after {args.rounds} rounds ({len(parts)} clients, {args.data_dir}):")
    print("| attack | attackers | " + " | ".join(args.rules) + " |")
    print("|---|---:|" + "---:|" * len(args.rules))
    for attack, attackers in cases:
        cells = " | ".join(f"{100 * table[attack, attackers, r]:.2f}%" for r in args.rules)
        print(f"| {attack or 'none'} | {attackers} | {cells} |")


def run_dp(args: argparse.Namespace) -> None:
    """Accuracy and ε for every noise multiplier and sampling rate."""
    parts, test_set = shards.load_all(args.data_dir)
    rows = []
    for fraction_fit in args.fraction_fit:
        for sigma in args.sigma:
            dp = (None if sigma < 0 else
                  privacy.DPConfig(sigma, args.clipping_norm, args.delta))
            print(f"q {fraction_fit}, sigma {sigma if dp else 'off'}", flush=True)
            records = federate(parts, test_set, rounds=args.rounds,
                               fraction_fit=fraction_fit, dp=dp, seed=args.seed)
            last = records[-1]
            rows.append((fraction_fit, sigma, last.get("epsilon"), last.get("epsilon_rdp"),
                         last["accuracy"]))
            emit({"bench": "dp", "data_dir": args.data_dir, "clients": len(parts),
                  "fraction_fit": fraction_fit, "sigma": sigma if dp else None,
                  "clipping_norm": args.clipping_norm, "delta": args.delta,
                  "rounds": records}, args.json)
    print(f"\nafter {args.rounds} rounds ({len(parts)} clients, C = {args.clipping_norm}, "
          f"δ = {args.delta}, {args.data_dir}):")
    print("| clients per round | σ | ε (PLD) | RDP bound | accuracy |")
    print("|---:|---:|---:|---:|---:|")
    for fraction_fit, sigma, eps, eps_rdp, accuracy in rows:
        shown = "off" if sigma < 0 else f"{sigma:g}"
        eps_text = ["–" if e is None else ("∞" if e == float("inf") else f"{e:.2f}")
                    for e in (eps, eps_rdp)]
        print(f"| {max(int(len(parts) * fraction_fit), 1)} | {shown} | {' | '.join(eps_text)} | "
              f"{100 * accuracy:.2f}% |")


def plot_attacks(args: argparse.Namespace) -> None:
    """A bar chart and a table of an attacks --json file (several invocations may have
    appended to it): accuracy per rule, attack and number of attackers."""
    import matplotlib  # noqa: PLC0415  (only this subcommand draws)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    with open(args.json, encoding="utf-8") as f:
        runs = [r for r in map(json.loads, f) if r["bench"] == "attacks"]
    rules = list(dict.fromkeys(r["rule"] for r in runs))
    cases = list(dict.fromkeys((r["attack"], r["attackers"]) for r in runs))
    accuracy = {(r["attack"], r["attackers"], r["rule"]): 100 * r["rounds"][-1]["accuracy"]
                for r in runs}
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    width = 0.8 / len(rules)
    for j, rule in enumerate(rules):
        xs = [i + (j - (len(rules) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [accuracy.get((a, k, rule), 0.0) for a, k in cases], width, label=rule)
    ax.set_xticks(range(len(cases)),
                  ["no attacker" if not k else f"{k} x {a}" for a, k in cases])
    rounds = len(runs[0]["rounds"])
    ax.set(ylabel=f"test accuracy after {rounds} rounds (%)", ylim=(0, 112),
           yticks=range(0, 101, 20),
           title=f"Poisoning clients out of {runs[0]['clients']} vs. the aggregation rule")
    ax.legend(loc="upper center", ncols=len(rules), fontsize="small")  # above the bars
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}\n")
    print("| attack | attackers | " + " | ".join(rules) + " |")
    print("|---|---:|" + "---:|" * len(rules))
    for attack, attackers in cases:
        cells = " | ".join(f"{accuracy[attack, attackers, r]:.2f}%"
                           if (attack, attackers, r) in accuracy else "–" for r in rules)
        print(f"| {attack or 'none'} | {attackers} | {cells} |")


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    for name in ("attacks", "dp"):
        s = sub.add_parser(name, help=f"the {name} table")
        s.add_argument("--data-dir", required=True, help="a partition_data.py directory")
        s.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
        s.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
        s.add_argument("--json", metavar="FILE", help="also append every run to FILE")
    a = sub.choices["attacks"]
    a.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES),
                   help="aggregation rules (default: all)")
    a.add_argument("--attack", nargs="+", choices=("sign-flip", "label-flip"),
                   default=["sign-flip", "label-flip"], help="attacks (default: both)")
    a.add_argument("--attackers", nargs="+", type=int, default=[1, 3],
                   help="numbers of attacking clients; an honest run is always added "
                        "(default: 1 3)")
    a.add_argument("--no-honest", action="store_true",
                   help="skip the run without attackers (e.g. when adding to a --json file "
                        "that has it)")
    a.add_argument("--boost", type=float, default=10.0, help="sign-flip boost (default: 10)")
    a.add_argument("--trim-fraction", type=float, default=0.2,
                   help="trimmed-mean's fraction (default: %(default)s)")
    a.add_argument("--krum-malicious", type=int, default=2,
                   help="Krum's f (default: %(default)s)")
    pl = sub.add_parser("plot", help="draw an attacks --json file as a bar chart")
    pl.add_argument("--json", required=True, help="the FILE of `attacks --json FILE`")
    pl.add_argument("--out", default="docs/attacks.png", help="PNG (default: %(default)s)")
    d = sub.choices["dp"]
    d.add_argument("--sigma", nargs="+", type=float, default=[-1, 0, 0.5, 1.0, 2.0],
                   help="noise multipliers; -1 runs without DP (default: %(default)s)")
    d.add_argument("--fraction-fit", nargs="+", type=float, default=[1.0],
                   help="sampling rates q (default: %(default)s)")
    d.add_argument("--clipping-norm", type=float, default=1.0,
                   help="C (default: %(default)s)")
    d.add_argument("--delta", type=float, default=1e-5, help="δ (default: %(default)s)")
    return p.parse_args()


def main() -> None:
    """Run the chosen table."""
    args = parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the clients' per-round lines
    try:
        {"attacks": run_attacks, "dp": run_dp, "plot": plot_attacks}[args.bench](args)
    except (shards.DataError, OSError, ValueError) as e:  # a wrong --data-dir or --json, or
        # settings the federation refuses (simulation.run's one line): one line
        sys.exit(f"bench_protection.py: error: {e}")


if __name__ == "__main__":
    main()
