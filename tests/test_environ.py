"""The test processes' guard for adding environment variables (``tests/_environ.py``).

After a polars read from S3, a thread of polars reads the environment every 100 ms for the
rest of the process; adding a variable then may free the array that thread walks (glibc's
``realloc``), and the process dies of SIGSEGV in ``getenv``. A pytest worker of CI died
that way. ``conftest.py`` installs the guard in every test process; these tests check that
the environment still behaves as ``os.environ`` promises with it, and (slow) that a process
adding and removing variables while polars' thread runs survives.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

import _environ
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the guard is installed on Linux only")

_libc = ctypes.CDLL(None)
_libc.getenv.restype = ctypes.c_char_p
_libc.getenv.argtypes = [ctypes.c_char_p]


def test_the_guard_is_installed_in_test_processes() -> None:
    assert os.putenv is _environ._safe_putenv
    assert os.unsetenv is _environ._safe_unsetenv


def test_changes_from_several_threads_are_none_lost() -> None:
    names = [[f"LAMIN_IO_THREAD_{t}_{i}" for i in range(300)] for t in range(4)]

    def change(mine: list[str]) -> None:
        for name in mine:
            os.environ[name] = "1"
        for name in mine[::2]:
            del os.environ[name]

    threads = [threading.Thread(target=change, args=(mine,)) for mine in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for mine in names:
            for i, name in enumerate(mine):
                assert (_libc.getenv(name.encode()) is None) == (i % 2 == 0), name
    finally:
        for mine in names:
            for name in mine:
                os.environ.pop(name, None)


def test_variables_set_added_and_removed_as_os_environ_promises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"LAMIN_IO_ENVIRON_TEST_{os.getpid()}"
    assert _libc.getenv(name.encode()) is None
    monkeypatch.setenv(name, "first")  # added
    assert _libc.getenv(name.encode()) == b"first"
    monkeypatch.setenv(name, "second")  # replaced
    assert _libc.getenv(name.encode()) == b"second"
    shown = subprocess.run([sys.executable, "-c", f"import os; print(os.environ['{name}'])"],
                           capture_output=True, text=True, check=True).stdout
    assert shown == "second\n"  # children inherit it
    monkeypatch.delenv(name)
    assert _libc.getenv(name.encode()) is None
    assert name not in os.environ
    os.environ[name] = "é ü"  # not ASCII: as os.environ encodes it
    try:
        assert _libc.getenv(name.encode()) == "é ü".encode()
    finally:
        del os.environ[name]
    _assert_environments_agree()


def _assert_environments_agree() -> None:
    """C's environment holds what os.environ holds (and, of our names, nothing more).

    Native code may add variables behind Python's back (readline sets ``LINES`` and
    ``COLUMNS`` when it starts), so only the names os.environ knows and ours are compared.
    """
    c = _c_environment()
    assert {k: c.get(k) for k in os.environb} == dict(os.environb)
    ours = {k for k in c if k.startswith(b"LAMIN_IO_")}
    assert ours == {k for k in os.environb if k.startswith(b"LAMIN_IO_")}


def _c_environment() -> dict[bytes, bytes]:
    """The variables in C's ``environ``, walked as ``getenv`` walks them."""
    array = ctypes.cast(ctypes.c_void_p.in_dll(_libc, "environ").value,
                        ctypes.POINTER(ctypes.c_char_p))
    out, i = {}, 0
    while array[i] is not None:
        name, _, value = array[i].partition(b"=")
        out[name] = value
        i += 1
    return out


def test_many_additions_keep_both_environments_equal() -> None:
    """Spare slots fill, the array doubles, removals shift it: nothing lost or repeated."""
    names = [f"LAMIN_IO_MANY_{i}" for i in range(500)]
    try:
        for round_ in range(3):
            for name in names:
                os.environ[name] = str(round_)
            for name in names[round_::3]:
                del os.environ[name]
            _assert_environments_agree()
    finally:
        for name in names:
            os.environ.pop(name, None)
    _assert_environments_agree()


@pytest.mark.parametrize(("name", "error", "match"), [
    ("", OSError, "Invalid argument"),
    ("A=B", ValueError, "illegal environment variable name"),
    ("A\0B", ValueError, "embedded null byte")])
def test_bad_names_raise_as_os_putenv_does(name: str, error: type[Exception],
                                           match: str) -> None:
    with pytest.raises(error, match=match):
        os.environ[name] = "x"
    assert name not in os.environ


#: A process that reads a table from S3 with polars (starting polars' thread that reads the
#: environment), then adds and removes variables for the seconds given, keeping buffers of
#: its own in between so that the environment's array cannot grow in place.
RACE = """\
import os, sys, time
sys.path.insert(0, {tests!r})
import pyarrow as pa, pyarrow.parquet as pq
import lamin_io as ln
from lamin_io.storage import to_upath
from lamin_io.testing import S3Server
import _environ
_environ.install()
for i in range(200):
    os.environ[f"LAMIN_IO_PAD_{{i}}"] = "x" * 20
with S3Server("environ-race") as server:
    pq.write_table(pa.table({{"a": list(range(1000))}}), {path!r})
    remote = to_upath("s3://environ-race/t.parquet", {{"endpoint_url": server.endpoint}})
    remote.fs.put({path!r}, remote.path)
    with ln.open("s3://environ-race/t.parquet", engine="polars",
                 storage_options={{"endpoint_url": server.endpoint}}) as lf:
        assert lf.collect().height == 1000
    end, n = time.monotonic() + {seconds}, 0
    while time.monotonic() < end:
        kept = []
        for j in range(1000):
            os.environ[f"LAMIN_IO_RACE_{{j}}"] = "1"
            kept.append(bytearray(700))
        for j in range(1000):
            del os.environ[f"LAMIN_IO_RACE_{{j}}"]
        n += 2000
    print(n)
"""


@pytest.mark.slow
def test_adding_variables_while_polars_reads_the_environment(tmp_path: Path) -> None:
    """A smoke test: unguarded, this child died of SIGSEGV (in ``getenv``, on polars'
    thread) in 2 of 7 runs of 20-30 s (6-9 million changes each), so a broken guard fails
    it about one run in three; guarded, it must live."""
    code = RACE.format(tests=str(Path(__file__).parent), path=str(tmp_path / "t.parquet"),
                       seconds=30)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert int(done.stdout.split()[-1]) > 100_000
