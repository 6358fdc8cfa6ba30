"""Checked command-line values, shared by every script: a bad one is refused at parse time.

argparse's type=float takes "inf" and "nan", type=int takes -1, and a plain string takes
"" for a directory or "localhost" for an address. The scripts then failed late (after
writing files, or after retrying for a minute) or ran with nonsense. The argparse types
here refuse such a value while the flags are parsed, so argparse prints its usage and
one line, "prog: error: argument --flag: ...", and exits with status 2 before anything
starts. The *_problem functions say the same for values that come in another way (the
Flower App's run config, server.py's settings).

argparse has no range or address types of its own; these are a few lines each.
"""

import argparse
import ipaddress
import math
import pathlib
import re
from collections.abc import Callable

# A wait or timeout longer than 30 days is a typo. It also stays far below
# threading.TIMEOUT_MAX (about 292 years), past which Python's waits raise OverflowError.
MAX_SECONDS = 30 * 24 * 3600
# Seeds of jax.random.key and np.random.default_rng: 32 bits, as most tools take them
# (jax.random.key overflows past 63 bits).
MAX_SEED = 2**32 - 1
# A host name label: letters, digits and hyphens, 1-63 long, no hyphen at either end (RFC 1123).
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def number_problem(value: float, low: float | None = None, high: float | None = None,
                   low_open: bool = False) -> str | None:
    """Why value is not a finite number in [low, high] ((low, high] with low_open), or None.

    E.g. "must be >= 1, got 0"; the caller puts the setting's name in front.
    """
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        if high is None:
            wanted = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            wanted = f"<= {high}"
        else:
            wanted = f"in {'(' if low_open else '['}{low}, {high}]"
        return f"must be {wanted}, got {value}"
    return None


def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) parsed from the text, finite and in range."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = number_problem(value, low, high, low_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


count = number(int, 1)  # rounds, clients, epochs: at least one
seed = number(int, 0, MAX_SEED)
port = number(int, 1, 65535)
seconds = number(float, 0, MAX_SECONDS)  # a wait: 0 means "try once"


def nonempty(text: str) -> str:
    """An argparse type for a path: "" would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (it would mean the current "
                                         "directory); name one")
    return text


def path(text: str) -> pathlib.Path:
    """nonempty, as a pathlib.Path."""
    return pathlib.Path(nonempty(text))


def host_problem(host: str) -> str | None:
    """Why host is neither an IP address nor a host name (a clause: "is empty"), or None."""
    if not host:
        return "is empty"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):  # all digits: meant as IPv4 (as browsers read it)
        return "is not an IPv4 address"
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        return "is neither an IP address nor a host name"
    return None


def address_problem(address: str) -> str | None:
    """Why address is not HOST:PORT (IPv6 as [HOST]:PORT), as a clause after it, or None."""
    host, colon, port_text = address.rpartition(":")
    if not colon or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return "is not HOST:PORT with a port from 1 to 65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
            return None
        except ValueError:
            return f"has {host}, which is not an IPv6 address"
    if ":" in host:
        return "has an IPv6 address without brackets: write [HOST]:PORT, e.g. [::1]:8080"
    problem = host_problem(host)
    return f"has the host {host!r}, which {problem}" if problem else None


def address(text: str) -> str:
    """An argparse type: HOST:PORT, checked by address_problem."""
    problem = address_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text
