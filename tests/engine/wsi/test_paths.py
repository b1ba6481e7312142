"""Which files a run reads (issue 28): regular files only, folder loops searched once, every file
once, each as the real path the OS resolves."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from cellvit_optimus.engine.wsi.paths import collect_inputs

CMU = "cmu-1-small-region.svs"


@pytest.fixture
def unblock_fifos():
    """a watchdog for tests that might block on a FIFO: after ``after_s`` it opens each FIFO for writing,
    which releases a reader stuck in open(), so a regression fails the test instead of hanging it"""
    fifos: list[Path] = []
    stop = threading.Event()

    def watch(after_s: float = 30.0) -> None:
        if stop.wait(after_s):
            return
        for f in fifos:
            try:
                fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader waits
                os.close(fd)
            except OSError:
                pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    yield fifos
    stop.set()
    t.join()


def test_a_walk_lists_fifos_sockets_and_broken_links_as_skipped_without_opening_them(tmp_path, slides_dir):
    shutil.copy(slides_dir / CMU, tmp_path / "good.svs")
    os.mkfifo(tmp_path / "fifo.svs")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.svs"))
    (tmp_path / "dangling.svs").symlink_to(tmp_path / "nowhere.svs")
    t0 = time.perf_counter()
    try:
        slides, skipped, missing = collect_inputs([tmp_path])
    finally:
        sock.close()
    assert time.perf_counter() - t0 < 10  # a FIFO opened for reading would block here for ever
    assert slides == [tmp_path / "good.svs"] and missing == []
    assert dict(skipped) == {str(tmp_path / "fifo.svs"): "a FIFO (named pipe), not a regular file",
                             str(tmp_path / "sock.svs"): "a socket, not a regular file",
                             str(tmp_path / "dangling.svs"): "broken link"}


def test_a_fifo_given_by_name_fails_as_not_a_slide_at_once(tmp_path, unblock_fifos):
    from cellvit_optimus.engine.errors import NotASlideError
    from cellvit_optimus.engine.wsi.slide import open_slide

    fifo = tmp_path / "fifo.svs"
    os.mkfifo(fifo)
    unblock_fifos.append(fifo)
    t0 = time.perf_counter()
    want = r"fifo\.svs: not a slide \(is a FIFO \(named pipe\), not a regular file"
    with pytest.raises(NotASlideError, match=want):
        open_slide(fifo)
    assert time.perf_counter() - t0 < 10, "open_slide waited on the FIFO (released by the watchdog)"
    with pytest.raises(NotASlideError, match="is a character device, not a regular file"):
        open_slide("/dev/null")


def test_a_link_back_up_the_tree_is_searched_once_and_each_file_listed_once(tmp_path, slides_dir):
    """issue 28: ``--recursive`` over a folder holding ``sub/loop -> ..`` triaged one slide 41 times"""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    shutil.copy(slides_dir / CMU, root / "x.svs")
    (root / "sub" / "loop").symlink_to("..")
    (root / "sub" / "alias.svs").symlink_to(root / "x.svs")
    os.link(root / "x.svs", root / "sub" / "hard.svs")
    slides, skipped, _ = collect_inputs([root, root / "x.svs"], recursive=True)
    assert slides == [root / "x.svs"]  # found first as sub/alias.svs: listed as the file it reads
    first = f"the same file as {root / 'sub' / 'alias.svs'} (listed once)"
    assert skipped == [(str(root / "sub" / "hard.svs"), first),
                       (str(root / "sub" / "loop"),
                        f"the same folder as {root}, searched once (a link back up the tree would loop)"),
                       (str(root / "x.svs"), first),  # in the walk
                       (str(root / "x.svs"), first)]  # and given by name


def test_inputs_are_the_files_the_os_resolves_not_the_text(tmp_path, slides_dir):
    """``a/lnk/../../x.svs`` with ``lnk`` a link: the OS resolves ``lnk/..`` to the link target's parent;
    collapsing it as text (os.path.abspath) named another file"""
    (tmp_path / "a").mkdir()
    deep = tmp_path / "deep" / "d1" / "d2"
    deep.mkdir(parents=True)
    (tmp_path / "a" / "lnk").symlink_to(deep)
    shutil.copy(slides_dir / CMU, tmp_path / "deep" / "x.svs")  # what the OS reads
    (tmp_path / "x.svs").write_text("the file the text names")
    given = f"{tmp_path}/a/lnk/../../x.svs"
    assert os.path.abspath(given) == str(tmp_path / "x.svs")  # the trap
    slides, skipped, missing = collect_inputs([given])
    assert slides == [tmp_path / "deep" / "x.svs"] and not skipped and not missing
