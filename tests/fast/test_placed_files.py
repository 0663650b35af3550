"""The engines' files reach another machine whole: written while engines there read them,
and by several copies at once where machines share a folder (tests/remote cover the ssh
path; this runs the same shell command here, as a host's shell would)."""

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from cloudlab.backends.remote import files_archive, place_files_command


def test_files_placed_at_once_are_never_seen_missing_or_partial(tmp_path):
    folder = tmp_path / "cluster"
    folder.mkdir()
    key = folder / "engine.json"
    content = "x" * 200_000
    key.write_text(content)
    key.chmod(0o600)
    archive, command = files_archive((key,)), place_files_command((key,))
    seen: set[str] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add("whole" if key.read_text() == content else "partial")
            except FileNotFoundError:
                seen.add("missing")

    def place(_) -> tuple[int, bytes]:
        run = subprocess.run(["sh", "-c", command], input=archive, capture_output=True)
        return run.returncode, run.stderr

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(place, range(48)))
    finally:
        done.set()
        reader.join()
    assert {code for code, _ in results} == {0}, [err for code, err in results if code][:1]
    assert seen == {"whole"}
    assert sorted(p.name for p in folder.iterdir()) == ["engine.json"]  # nothing left over
    assert key.stat().st_mode & 0o777 == 0o600
