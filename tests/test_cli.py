"""The lamin-io command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from conftest import write_bytes


def run(env, *args, check_rc=0):
    proc = subprocess.run([sys.executable, "-m", "lamin_io.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == check_rc, (proc.stdout, proc.stderr)
    return proc


def test_cli_round_trip(cli_env, tmp_path):
    out = run(cli_env, "connect", "--registry", str(tmp_path / "r.db"),
              "--storage", str(tmp_path / "store")).stdout
    assert "r.db" in out
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    assert "t.csv" in run(cli_env, "save", str(f), "--key", "proj/t.csv").stdout
    listing = run(cli_env, "ls", "proj/").stdout
    assert "proj/t.csv" in listing
    assert "sha256" in run(cli_env, "describe", "proj/t.csv").stdout
    path = run(cli_env, "cache", "proj/t.csv").stdout.strip()
    assert open(path, "rb").read() == b"a\n1\n"  # noqa: PTH123
    run(cli_env, "delete", "proj/t.csv", check_rc=2)  # no --yes off a terminal
    run(cli_env, "delete", "proj/t.csv", "--yes")
    assert "proj/t.csv" not in run(cli_env, "ls").stdout
    assert "0 unfinished" in run(cli_env, "gc").stdout


def test_cli_errors_and_help(cli_env, tmp_path):
    run(cli_env, "connect", "--registry", str(tmp_path / "r.db"),
        "--storage", str(tmp_path / "store"))
    err = run(cli_env, "describe", "missing.csv", check_rc=3).stderr
    assert err.startswith("error: no artifact matches")
    assert "Traceback" not in err
    assert "does not exist" in run(cli_env, "save", str(tmp_path / "nope.csv"),
                                   check_rc=3).stderr
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    assert "unsafe key" in run(cli_env, "save", str(f), "--key", "../t.csv",
                               check_rc=1).stderr
    for cmd in ("connect", "save", "ls", "describe", "cache", "delete", "gc"):
        assert "Usage:" in run(cli_env, cmd, "--help").stdout
    assert "Exit codes" in run(cli_env, "--help").stdout
    run(cli_env, "frobnicate", check_rc=2)


def test_import_is_light():
    code = ("import sys, lamin_io; heavy = {'sqlalchemy', 'anndata', 'pandas', 's3fs', "
            "'zarr', 'h5py', 'pyarrow', 'torch', 'polars'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_delete_reports_the_version_and_revises_another_key(cli_env, tmp_path):
    run(cli_env, "connect", "--registry", str(tmp_path / "r.db"),
        "--storage", str(tmp_path / "store"))
    run(cli_env, "save", str(write_bytes(tmp_path / "a.csv", b"a\n1\n")), "--key", "old/t.csv")
    # a new version without --key keeps the family's key
    out = run(cli_env, "save", str(write_bytes(tmp_path / "b.csv", b"a\n2\n")),
              "--revises", "old/t.csv").stdout
    assert "key='old/t.csv'" in out
    assert "version='2'" in out
    # with another --key: saved, and the family's key change is said
    proc = run(cli_env, "save", str(write_bytes(tmp_path / "c.csv", b"a\n3\n")),
               "--revises", "old/t.csv", "--key", "new/t.csv")
    assert "key='new/t.csv'" in proc.stdout
    assert "version='3'" in proc.stdout
    assert ("the family of 'old/t.csv' now has key 'new/t.csv': version 3 was saved under the "
            "new key") in proc.stderr
    assert "Traceback" not in proc.stderr
    # delete says which version it deleted: the latest, or the one asked for
    assert run(cli_env, "delete", "new/t.csv", "--yes").stdout.startswith(
        "deleted new/t.csv (version 3, uid ")
    assert run(cli_env, "delete", "old/t.csv", "--version", "1", "--yes").stdout.startswith(
        "deleted old/t.csv (version 1, uid ")
    rows = [line.split() for line in run(cli_env, "ls", "--all-versions").stdout.splitlines()
            if "t.csv" in line]
    assert [row[:2] for row in rows] == [["old/t.csv", "2"]]  # the one version left


def test_cli_ls_orders_and_pages(cli_env, tmp_path):
    run(cli_env, "connect", "--registry", str(tmp_path / "r.db"),
        "--storage", str(tmp_path / "store"))
    for name, size in (("a.csv", 30), ("b.csv", 10), ("c.csv", 20)):
        run(cli_env, "save", str(write_bytes(tmp_path / name, b"x" * size)), "--key", name)

    def listed(*args):
        lines = run(cli_env, "ls", *args).stdout.splitlines()[1:]  # (after the header)
        return [line.split()[0] for line in lines if line.strip()]

    assert listed("--order-by", "-size") == ["a.csv", "c.csv", "b.csv"]
    assert listed("--order-by", "size", "--limit", "2") == ["b.csv", "c.csv"]
    assert listed("--order-by", "size", "--limit", "2", "--page", "2") == ["a.csv"]
    err = run(cli_env, "ls", "--page", "2", check_rc=2).stderr
    assert "--page needs --limit" in err
    err = run(cli_env, "ls", "--order-by", "colour", check_rc=1).stderr
    assert err.startswith("error: cannot order by 'colour'")


def test_cli_ls_filters_and_lineage(cli_env, tmp_path):
    import lamin_io as ln

    registry, storage = tmp_path / "r.db", tmp_path / "store"
    run(cli_env, "connect", "--registry", str(registry), "--storage", str(storage))
    ln.connect(registry, storage)
    raw = ln.Artifact(write_bytes(tmp_path / "raw.csv", b"a\n" + b"1\n" * 5000),
                      key="raw.csv", description="PBMC counts, raw").save(mute=True)
    with ln.track(name="clean-step") as step:
        raw.load()
        ln.Artifact(write_bytes(tmp_path / "clean.csv", b"a\n2\n"), key="clean.csv",
                    description="PBMC counts, clean").save(mute=True)
        ln.Artifact(write_bytes(tmp_path / "notes.txt", b"notes"), key="notes.txt").save()
    ln.disconnect()

    def listed(*args):
        lines = run(cli_env, "ls", *args).stdout.splitlines()[1:]  # (after the header)
        return sorted(line.split()[0] for line in lines if line.strip())

    assert listed("--description", "PBMC") == ["clean.csv", "raw.csv"]
    assert listed("--description", "raw") == ["raw.csv"]
    assert listed("--suffix", ".txt") == ["notes.txt"]
    assert listed("--min-size", "10kB") == ["raw.csv"]
    assert listed("--max-size", "0.01MB") == ["clean.csv", "notes.txt"]
    assert listed("--since", "2000-01-01") == ["clean.csv", "notes.txt", "raw.csv"]
    assert listed("--until", "2000-01-01") == []
    assert listed("--transform", "clean-step") == ["clean.csv", "notes.txt"]
    assert listed("--run", step.uid, "--suffix", ".csv") == ["clean.csv"]
    err = run(cli_env, "ls", "--min-size", "ten", check_rc=2).stderr
    assert "'ten' is no size" in err

    out = run(cli_env, "lineage", "clean.csv").stdout.splitlines()
    assert out[0].startswith("artifact clean.csv (v1, uid ")
    assert f"run {step.uid} · script clean-step" in out[1]
    assert out[2].endswith(f"artifact raw.csv (v1, uid {raw.uid})")
    assert out[3].endswith("(saved outside a tracked run)")
    assert "read by:" in run(cli_env, "lineage", "raw.csv").stdout
    dot = tmp_path / "g.dot"
    run(cli_env, "lineage", "clean.csv", "--image", str(dot))
    assert raw.uid in dot.read_text()
    err = run(cli_env, "lineage", "missing.csv", check_rc=3).stderr
    assert err.startswith("error: no artifact or collection has key")
