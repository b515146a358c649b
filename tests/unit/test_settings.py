"""settings.py: flag > BLOBMOUNT_* > config file > default, for every option the parser has;
secrets refused from the environment and from a config file others can read."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from blobmount.cli import main
from blobmount.cli.options import registry_options
from blobmount.cli.parser import build_parser, normalize_argv
from blobmount.errors import UsageError
from blobmount.settings import clamp_timeout, kernel_request_timeout, request_bound, resolve


def run(argv: list[str], env: dict[str, str] | None = None, config: str | None = None, tmp: Path | None = None):  # type: ignore[no-untyped-def]
    environ = dict(env or {})
    if config is not None:
        assert tmp is not None
        path = tmp / "config.toml"
        path.write_text(config)
        path.chmod(0o600)
        environ["BLOBMOUNT_CONFIG"] = str(path)
    parser = build_parser()
    return resolve(parser, normalize_argv(argv, parser), environ)


def test_precedence_flag_env_config_default(tmp_path: Path) -> None:
    cfg = 'cache_size = "3G"\ntimeout = 7\nverify = "strict"\n'
    base = ["SRC", "MNT"]
    r = run(base, tmp=tmp_path, config=cfg)
    assert (r.args.cache_size, r.args.timeout, r.args.verify) == ("3G", 7.0, "strict")
    assert r.origin["cache_size"] == "config"
    assert r.args.max_connections == 8
    assert r.origin["max_connections"] == "default"
    r = run(base, {"BLOBMOUNT_CACHE_SIZE": "2G", "BLOBMOUNT_TIMEOUT": "9.5"}, cfg, tmp_path)
    assert (r.args.cache_size, r.args.timeout, r.args.verify) == ("2G", 9.5, "strict")
    assert r.origin["cache_size"] == "env"
    r = run([*base, "--cache-size", "1G"], {"BLOBMOUNT_CACHE_SIZE": "2G"}, cfg, tmp_path)
    assert r.args.cache_size == "1G"
    assert r.origin["cache_size"] == "flag"
    r = run(base)
    assert r.args.cache_size is None
    assert r.args.timeout == 30.0


def test_o_options_come_right_after_the_flag(tmp_path: Path) -> None:
    """flag > -o > environment > config file > default, all decided in settings.resolve."""
    r = run(["SRC", "MNT", "-o", "cache_size=5G,allow_other"], {"BLOBMOUNT_CACHE_SIZE": "2G"})
    assert (r.args.cache_size, r.origin["cache_size"]) == ("5G", "option")
    r = run(["SRC", "MNT", "-o", "cache_size=5G", "--cache-size", "1G"], {"BLOBMOUNT_CACHE_SIZE": "2G"})
    assert (r.args.cache_size, r.origin["cache_size"]) == ("1G", "flag")
    config = tmp_path / "c.toml"
    config.write_text("timeout = 7\nread_ahead_kb = 64\n")
    r = run(["SRC", "MNT", "--config", str(config), "-o", "read_ahead_kb=256"])
    assert (r.args.read_ahead_kb, r.origin["read_ahead_kb"]) == (256, "option")  # typed like the flag
    assert (r.args.timeout, r.origin["timeout"]) == (7.0, "config")


def test_o_switches_and_lists() -> None:
    r = run(["SRC", "MNT", "--prefetch", "a", "-o", "offline,prefetch=b c,follow_keep=3"], {"BLOBMOUNT_OFFLINE": "0"})
    assert (r.args.offline, r.origin["offline"]) == (True, "option")
    assert r.args.prefetch == ["a", "b c"]  # the flag's and the -o value, kept whole
    assert r.args.follow_keep == 3


def test_a_bad_o_value_is_one_usage_error() -> None:
    with pytest.raises(UsageError, match=r"-o verify: invalid value 'sometimes' \(choose from"):
        run(["SRC", "MNT", "-o", "verify=sometimes"])
    with pytest.raises(UsageError, match=r"-o read_ahead_kb: invalid value 'lots'"):
        run(["SRC", "MNT", "-o", "read_ahead_kb=lots"])
    with pytest.raises(UsageError, match="unknown mount option -o colour"):
        run(["SRC", "MNT", "-o", "colour=blue"])


def test_source_and_mountpoint_from_the_environment() -> None:
    env = {"BLOBMOUNT_SOURCE": "dir:/srv/arc", "BLOBMOUNT_MOUNTPOINT": "/mnt/a", "BLOBMOUNT_FOREGROUND": "yes"}
    r = run(["--foreground"], env)
    assert (r.args.command, r.args.source, r.args.mountpoint, r.args.foreground) == (
        "mount",
        "dir:/srv/arc",
        "/mnt/a",
        True,
    )
    r = run([], env)  # no arguments at all: a container's entrypoint
    assert r.args.command is None  # bare `blobmount` still prints usage...
    r = run(["-v"], env)
    assert r.args.command == "mount"
    assert r.args.verbose == 1


def test_values_are_typed_and_checked(tmp_path: Path) -> None:
    r = run(["SRC", "MNT"], {"BLOBMOUNT_MIRROR": "m1:5000, m2:5000", "BLOBMOUNT_UID": "1000", "BLOBMOUNT_VERBOSE": "2"})
    assert r.args.mirror == ["m1:5000", "m2:5000"]
    assert r.args.uid == 1000
    assert r.args.verbose == 2
    r = run(["SRC", "MNT"], {"BLOBMOUNT_OPTIONS": "allow_other,cache_size=1G"})
    assert r.args.options == ["allow_other,cache_size=1G"]
    r = run(
        ["SRC", "MNT"], config='mirror = ["a:1", "b:2"]\nforeground = true\nca_file = "/etc/ca.pem"\n', tmp=tmp_path
    )
    assert r.args.mirror == ["a:1", "b:2"]
    assert r.args.foreground is True
    assert r.args.ca_file == Path("/etc/ca.pem")
    with pytest.raises(UsageError, match="choose from"):
        run(["SRC", "MNT"], {"BLOBMOUNT_VERIFY": "sometimes"})
    with pytest.raises(UsageError, match="BLOBMOUNT_UID"):
        run(["SRC", "MNT"], {"BLOBMOUNT_UID": "root"})
    with pytest.raises(UsageError, match="true/yes"):
        run(["SRC", "MNT"], {"BLOBMOUNT_FOREGROUND": "perhaps"})
    with pytest.raises(UsageError, match="unknown key"):
        run(["SRC", "MNT"], config="cache_sise = 1\n", tmp=tmp_path)
    with pytest.raises(UsageError, match="expected true or false"):
        run(["SRC", "MNT"], config='foreground = "yes"\n', tmp=tmp_path)


def test_unknown_variables_warn_and_secrets_are_refused() -> None:
    r = run(["SRC", "MNT"], {"BLOBMOUNT_CACHESIZE": "1G", "BLOBMOUNT_ARGS": "-o allow_other"})
    assert r.warnings == ["BLOBMOUNT_CACHESIZE is not a blobmount setting; ignored"]
    for name in ("BLOBMOUNT_PASSWORD", "BLOBMOUNT_REGISTRY_TOKEN", "BLOBMOUNT_SECRET"):
        with pytest.raises(UsageError, match="secrets are never read"):
            run(["SRC", "MNT"], {name: "hunter2"})
    r = run(["SRC", "MNT"], {"BLOBMOUNT_PASSWORD_FILE": "/run/secrets/pw", "BLOBMOUNT_USERNAME": "robot"})
    assert r.args.password_file == Path("/run/secrets/pw")


def test_config_password_only_from_a_private_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('username = "robot"\npassword = "s3cret"\n')
    cfg.chmod(0o640)
    assert main(["--config", str(cfg), "ls", f"dir:{tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "others may read it" in err
    assert "s3cret" not in err
    cfg.chmod(0o600)
    r = run(["ls", "x"], {"BLOBMOUNT_CONFIG": str(cfg)})
    creds = registry_options(r.args).credentials
    assert creds is not None
    assert (creds.username, creds.password) == ("robot", "s3cret")
    with pytest.raises(UsageError, match="does not exist"):
        run(["ls", "x"], {"BLOBMOUNT_CONFIG": str(tmp_path / "missing.toml")})


def test_normalize_skips_option_values() -> None:
    parser = build_parser()
    assert normalize_argv(["--cache-dir", "ls", "SRC", "MNT"], parser)[0] == "mount"
    assert normalize_argv(["-v", "ls", "SRC"], parser) == ["-v", "ls", "SRC"]
    assert normalize_argv(["--version"], parser) == ["--version"]
    args = parser.parse_args(normalize_argv(["--cache-dir", "/c", "-o", "ro", "SRC", "MNT"], parser))
    assert isinstance(args, argparse.Namespace)
    assert (args.command, args.cache_dir, args.source) == ("mount", Path("/c"), "SRC")


def test_every_option_has_a_variable() -> None:
    """New options get their BLOBMOUNT_* name for free: the mapping reads the parser."""
    parser = build_parser()
    r = resolve(parser, ["mount", "S", "M"], {"BLOBMOUNT_DEBUG": "1", "BLOBMOUNT_METRICS": ":9101"})
    assert r.args.debug is True
    assert r.args.metrics == ":9101"


def _sysctls(tmp: Path, default: str | None, maximum: str | None) -> Path:
    """A stand-in for /proc/sys/fs/fuse (None: the file is absent, as before Linux 6.15)."""
    for name, value in (("default_request_timeout", default), ("max_request_timeout", maximum)):
        if value is not None:
            (tmp / name).write_text(value + "\n")
    return tmp


@pytest.mark.parametrize(
    ("default", "maximum", "kernel_s"),
    [
        (None, None, 0),  # an older kernel: no timeout
        ("0", "0", 0),  # the default: off
        ("15", "0", 15),
        ("0", "40", 40),  # a maximum alone opts every mount in
        ("60", "40", 40),  # the maximum caps the default
        ("15", "40", 15),
        ("junk", "", 0),
    ],
)
def test_the_kernel_request_timeout_is_read_as_the_kernel_does(
    tmp_path: Path, default: str | None, maximum: str | None, kernel_s: int
) -> None:
    assert kernel_request_timeout(_sysctls(tmp_path, default, maximum)) == kernel_s


def test_the_request_bound_leaves_a_margin_under_the_kernel_timeout() -> None:
    assert request_bound(0) == math.inf
    assert request_bound(15) == 12.0  # 15 - max(2, 3)
    assert request_bound(60) == 48.0  # a fifth
    assert request_bound(5) == 3.0  # at least 2 s
    assert request_bound(1) == 0.5  # never under half
    for kernel_s in range(1, 200):
        assert kernel_s / 2 <= request_bound(kernel_s) <= kernel_s - min(2.0, kernel_s / 2)


def test_timeout_is_clamped_with_one_warning_only_when_it_passes_the_bound() -> None:
    assert clamp_timeout(30.0, 0) == (30.0, None)
    assert clamp_timeout(12.0, 15) == (12.0, None)
    assert clamp_timeout(2.0, 15) == (2.0, None)
    timeout, warning = clamp_timeout(30.0, 15)
    assert timeout == 12.0
    assert warning is not None
    assert "--timeout 30 s is longer" in warning
    assert "(15 s," in warning
    assert "using --timeout 12 s" in warning
    assert "\n" not in warning
