"""Download scripts: layout checks on the real copies in ../shared/data, and the whole
download -> MD5 -> extract -> layout path on archives built in tmp_path (``file://`` and a
local HTTP server; nothing leaves this machine)."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import json
import os
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fl_imaging.data.datasets import msd_download
from fl_imaging.data.datasets.class_folders_download import (
    MEDNIST_SOURCES,
    ArchiveSource,
    class_folder_layout_problems,
    class_folder_summary,
    fetch_mednist,
)
from fl_imaging.data.datasets.medmnist_download import (
    fetch_medmnist,
    medmnist_layout_problems,
    medmnist_md5,
    medmnist_summary,
)
from fl_imaging.data.datasets.msd_download import (
    MSD_MD5,
    fetch_msd_task,
    msd_layout_problems,
    msd_summary,
)
from fl_imaging.data.fetch import (
    ChecksumError,
    DownloadError,
    Fetched,
    UnsafeArchiveError,
    download_file,
    extract_archive,
    md5_of,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FL_IMAGING_SHARED_DATA", REPO / ".." / "shared" / "data"))
MSD = SHARED / "msd_task04_hippocampus"
MEDMNIST = SHARED / "medmnist_adrenalmnist3d"
MEDNIST = SHARED / "mednist_rsna_64x64"


def _shared(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"public test data not found at {folder} (set FL_IMAGING_SHARED_DATA)")
    return folder


@cache
def _script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"_script_{name}", REPO / "scripts" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _msd_tar(where: Path, task: str = "Task99_Test") -> tuple[Path, int]:
    """A tar shaped like an official MSD task tar, macOS ``._`` files included; returns it and
    the number of junk files in it."""
    members: dict[str, bytes] = {
        f"{task}/dataset.json": json.dumps(
            {
                "name": "Test",
                "training": [
                    {"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"}
                    for i in (1, 2)
                ],
                "test": ["./imagesTs/case_3.nii.gz"],
            }
        ).encode(),
        f"{task}/imagesTr/case_1.nii.gz": b"image-1",
        f"{task}/imagesTr/case_2.nii.gz": b"image-2",
        f"{task}/labelsTr/case_1.nii.gz": b"label-1",
        f"{task}/labelsTr/case_2.nii.gz": b"label-2",
        f"{task}/imagesTs/case_3.nii.gz": b"image-3",
    }
    junk = {
        f"._{task}": b"\x00\x05\x16\x07",
        f"{task}/._dataset.json": b"\x00\x05\x16\x07",
        f"{task}/imagesTr/._case_1.nii.gz": b"\x00\x05\x16\x07",
        f"{task}/labelsTr/._case_1.nii.gz": b"\x00\x05\x16\x07",
    }
    path = where / f"{task}.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in {**members, **junk}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path, len(junk)


def _class_archive(where: Path, top: str, suffix: str, kind: str, extra: dict[str, bytes]) -> Path:
    """A zip or tar.gz holding ``top/<Class>/*suffix`` for three classes, plus ``extra``."""
    members = {
        f"{top}/{c}/{i:03d}{suffix}": b"\xff\xd8jpeg"
        for c in ("CTAbd", "CXR", "MRBrain")
        for i in range(3)
    }
    members.update(extra)
    if kind == "zip":
        path = where / f"{top}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        path = where / f"{top}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _npz(path: Path, n: tuple[int, int, int] = (4, 2, 2), size: int = 28, drop: str = "") -> Path:
    """A small MedMNIST-like 3D .npz (``drop`` leaves one array out)."""
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = np.zeros((count, size, size, size), np.uint8)
        arrays[f"{split}_labels"] = np.arange(count, dtype=np.uint8).reshape(count, 1) % 2
    arrays.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------
# Layout checks on the real copies, and on broken ones
# ------------------------------------------------------------------------------------------


def test_layout_checks_pass_on_the_shared_copies() -> None:
    msd = _shared(MSD)
    assert msd_layout_problems(msd) == []
    assert "260 training entries" in msd_summary(msd)
    medmnist = _shared(MEDMNIST)
    for size in (28, 64):
        assert medmnist_layout_problems(medmnist, "adrenalmnist3d", size) == []
    assert "train 1188, val 98, test 298" in medmnist_summary(medmnist, "adrenalmnist3d", 64)
    mednist = _shared(MEDNIST)
    assert class_folder_layout_problems(mednist) == []
    assert "6 class folder(s), 3000 images" in class_folder_summary(mednist)


def test_msd_check_reports_a_copy_without_labels(tmp_path: Path) -> None:
    broken = tmp_path / "Task04_Hippocampus"
    broken.mkdir()
    (broken / "dataset.json").symlink_to(_shared(MSD) / "dataset.json")
    (broken / "imagesTr").symlink_to(MSD / "imagesTr")
    problems = msd_layout_problems(broken)
    assert any("labelsTr/ is missing" in p for p in problems), problems
    assert any("lists 260 file(s) that are not there" in p for p in problems), problems
    assert msd_layout_problems(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} is not a folder"]


def test_msd_check_reports_junk_and_unpaired_files(tmp_path: Path) -> None:
    tar, _ = _msd_tar(tmp_path)
    extract_archive(tar, tmp_path / "raw")
    task = tmp_path / "raw" / "Task99_Test"
    (task / "labelsTr" / "case_2.nii.gz").unlink()
    problems = " | ".join(msd_layout_problems(task))
    assert "macOS '._' file(s)" in problems and "case_2.nii.gz" in problems


def test_medmnist_check_reports_a_missing_key_and_mismatched_counts(tmp_path: Path) -> None:
    _npz(tmp_path / "adrenalmnist3d.npz", drop="test_labels")
    problems = medmnist_layout_problems(tmp_path, "adrenalmnist3d", 28)
    assert problems == [f"{tmp_path / 'adrenalmnist3d.npz'} lacks the array(s) test_labels"]

    path = _npz(tmp_path / "bad" / "adrenalmnist3d_64.npz", size=64)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["val_labels"] = arrays["val_labels"][:1]
    np.savez(path, **arrays)
    problems = medmnist_layout_problems(path.parent, "adrenalmnist3d", 64)
    assert problems == [f"{path}: val_images has 2 images but val_labels has 1 labels"]
    # the same file read as the 28 px size is the wrong shape; a missing size is named
    path.rename(path.parent / "adrenalmnist3d.npz")
    problems = medmnist_layout_problems(path.parent, "adrenalmnist3d", 28)
    assert sum("expected (N, 28, 28, 28)" in p for p in problems) == 3, problems
    assert "not found" in medmnist_layout_problems(tmp_path, "adrenalmnist3d", 64)[0]
    (tmp_path / "organmnist3d.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in medmnist_layout_problems(tmp_path, "organmnist3d", 28)[0]


def test_class_folder_check_reports_a_single_class_and_a_nested_folder(tmp_path: Path) -> None:
    single = tmp_path / "single" / "CXR"
    single.mkdir(parents=True)
    for name in sorted(os.listdir(_shared(MEDNIST) / "CXR"))[:3]:
        (single / name).symlink_to(MEDNIST / "CXR" / name)
    problems = class_folder_layout_problems(single.parent)
    assert problems == [f"{single.parent} holds 1 class folder(s) (CXR); at least 2 are needed"]

    nested = tmp_path / "nested"
    (nested / "MedNIST_64x64_500").mkdir(parents=True)
    for cls in ("CTAbd", "CXR"):
        (nested / "MedNIST_64x64_500" / cls).symlink_to(MEDNIST / cls)
    problems = class_folder_layout_problems(nested)
    assert "(MedNIST_64x64_500)" in problems[0] and "pass that folder instead" in problems[0]
    assert class_folder_layout_problems(nested / "MedNIST_64x64_500") == []

    (nested / "MedNIST_64x64_500" / "Empty").mkdir()
    (problem,) = class_folder_layout_problems(nested / "MedNIST_64x64_500")
    assert "hold no image files" in problem and "Empty" in problem


# ------------------------------------------------------------------------------------------
# Download -> checksum -> extract, end to end on file:// and local HTTP URLs
# ------------------------------------------------------------------------------------------


def test_msd_task_download_unpacks_and_removes_macos_junk(tmp_path: Path) -> None:
    tar, n_junk = _msd_tar(tmp_path)
    out = tmp_path / "out"
    got = fetch_msd_task("Task99_Test", out, url=tar.as_uri(), md5=_md5(tar), quiet=True)
    assert got == Fetched(out / "Task99_Test", downloaded=True, junk_removed=n_junk)
    assert _files(out) == [
        "Task99_Test",
        "Task99_Test/dataset.json",
        "Task99_Test/imagesTr",
        "Task99_Test/imagesTr/case_1.nii.gz",
        "Task99_Test/imagesTr/case_2.nii.gz",
        "Task99_Test/imagesTs",
        "Task99_Test/imagesTs/case_3.nii.gz",
        "Task99_Test/labelsTr",
        "Task99_Test/labelsTr/case_1.nii.gz",
        "Task99_Test/labelsTr/case_2.nii.gz",
    ]  # no ._ files, no tar, no staging folder
    assert msd_layout_problems(got.path) == []
    again = fetch_msd_task("Task99_Test", out, url="file:///nowhere", md5="0" * 32, quiet=True)
    assert again == Fetched(out / "Task99_Test", downloaded=False)


def test_wrong_md5_fails_with_its_message_and_leaves_no_dataset(tmp_path: Path) -> None:
    tar, _ = _msd_tar(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ChecksumError) as caught:
        fetch_msd_task("Task99_Test", out, url=tar.as_uri(), md5="0" * 32, quiet=True)
    message = str(caught.value)
    part = out / "Task99_Test.tar.part"
    assert f"MD5 mismatch for {part}: expected {'0' * 32}, got {_md5(tar)}" in message
    assert f"Delete it ({part}) and run the download again" in message
    assert _files(out) == ["Task99_Test.tar.part"]  # never renamed, nothing unpacked

    part.unlink()  # as the message says; the next run succeeds
    assert fetch_msd_task("Task99_Test", out, url=tar.as_uri(), md5=_md5(tar), quiet=True)


@pytest.mark.parametrize(
    ("kind", "top", "suffix"), [("zip", "MedNIST_64x64_500", ".jpg"), ("tgz", "MedNIST", ".jpeg")]
)
def test_mednist_archive_is_flattened_into_class_folders(
    tmp_path: Path, kind: str, top: str, suffix: str
) -> None:
    junk = {
        f"{top}/CXR/._000{suffix}": b"\x00\x05\x16\x07",
        f"{top}/.DS_Store": b"\x00",
        f"__MACOSX/{top}/CXR/._000{suffix}": b"\x00\x05\x16\x07",
    }
    archive = _class_archive(tmp_path, top, suffix, kind, junk)
    source = ArchiveSource(archive.as_uri(), _md5(archive), archive.name, top)
    out = tmp_path / "out"
    got = fetch_mednist(source, out, quiet=True)
    assert got == Fetched(out, downloaded=True, junk_removed=3)
    assert _files(out) == sorted(
        ["CTAbd", "CXR", "MRBrain"]
        + [f"{c}/{i:03d}{suffix}" for c in ("CTAbd", "CXR", "MRBrain") for i in range(3)]
    )
    assert class_folder_layout_problems(out) == []
    assert fetch_mednist(source, out, quiet=True).downloaded is False


@pytest.mark.parametrize("kind", ["zip", "tar-absolute", "tar-link"])
def test_an_unsafe_archive_member_is_refused_before_anything_is_written(
    tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    if kind == "zip":
        archive = _class_archive(src, "MedNIST_64x64_500", ".jpg", "zip", {"../evil.txt": b"x"})
        bad = "../evil.txt"
    else:
        archive = _class_archive(src, "MedNIST_64x64_500", ".jpg", "tgz", {})
        bad = "/tmp/evil.txt" if kind == "tar-absolute" else "MedNIST_64x64_500/CXR/link.jpg"
        with tarfile.open(archive, "r:gz") as tf:
            kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]
        with tarfile.open(archive, "w:gz") as tf:
            for member, data in kept:
                tf.addfile(member, io.BytesIO(data))
            info = tarfile.TarInfo(bad)
            if kind == "tar-link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = 1
                tf.addfile(info, io.BytesIO(b"x"))
    source = ArchiveSource(archive.as_uri(), _md5(archive), archive.name, "MedNIST_64x64_500")
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(bad))):
        fetch_mednist(source, out, quiet=True)
    assert not (tmp_path / "evil.txt").exists()
    assert _files(out) == [archive.name]  # the checked archive only: no class folder, no staging


def test_medmnist_file_download_and_its_checksum(tmp_path: Path) -> None:
    src = _npz(tmp_path / "src" / "testmnist3d_64.npz", size=64)
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="--md5 on the command line"):
        fetch_medmnist("testmnist3d", 64, out, url=src.as_uri(), quiet=True)
    assert not out.exists()
    with pytest.raises(ChecksumError, match="Delete it"):
        fetch_medmnist("testmnist3d", 64, out, md5="f" * 32, url=src.as_uri(), quiet=True)
    assert _files(out) == ["testmnist3d_64.npz.part"]
    got = fetch_medmnist("testmnist3d", 64, out, md5=_md5(src), url=src.as_uri(), quiet=True)
    assert got == Fetched(out, downloaded=True)  # the .part was restarted, not appended to
    assert _files(out) == ["testmnist3d_64.npz"] and _md5(out / "testmnist3d_64.npz") == _md5(src)
    again = fetch_medmnist("testmnist3d", 64, out, md5=_md5(src), url="file:///x", quiet=True)
    assert again.downloaded is False
    with pytest.raises(DownloadError, match="published in sizes 28, 64 only"):
        fetch_medmnist("adrenalmnist3d", 128, out, quiet=True)


class _RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` at any path and honours ``Range: bytes=N-``."""

    payload = b""
    ranges: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook name)
        start = 0
        if rng := self.headers.get("Range"):
            self.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        if rng:
            end = len(self.payload) - 1
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data.bin"
    finally:
        server.shutdown()
        server.server_close()


def test_an_interrupted_download_resumes_with_a_range_request(
    tmp_path: Path, http_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = os.urandom(300_000)
    _RangeServer.payload, _RangeServer.ranges = payload, []
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(payload[:100_000])
    download_file(http_url, dest, hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and _RangeServer.ranges == ["bytes=100000-"]
    err = capsys.readouterr().err
    assert "resuming at 97.7 KB" in err and "data.bin: 293.0 KB / 293.0 KB (100%)" in err


def test_an_existing_file_with_the_wrong_md5_is_named(tmp_path: Path) -> None:
    dest = tmp_path / "Task04_Hippocampus.tar"
    dest.write_bytes(b"truncated")
    with pytest.raises(ChecksumError) as caught:
        download_file("file:///unused", dest, MSD_MD5["Task04_Hippocampus"], quiet=True)
    assert str(caught.value).startswith(
        f"MD5 mismatch for {dest}: expected 9d24dba78a72977dbd1d2e110310f31b, "
        f"got {hashlib.md5(b'truncated').hexdigest()}."
    )


def test_msd_and_mednist_checksums_are_monais() -> None:
    """The MSD and MONAI MedNIST MD5s are those in MONAI's own monai/apps/datasets.py."""
    spec = importlib.util.find_spec("monai")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("monai is not installed")
    text = (Path(spec.submodule_search_locations[0]) / "apps" / "datasets.py").read_text()
    monai_msd = dict(re.findall(r'"(Task\d\d_\w+)": "([0-9a-f]{32})"', text))
    assert monai_msd == MSD_MD5 and len(MSD_MD5) == 10
    assert f'md5 = "{MEDNIST_SOURCES["monai"].md5}"' in text


def test_medmnist_checksums_match_the_official_files() -> None:
    medmnist = _shared(MEDMNIST)
    assert md5_of(medmnist / "adrenalmnist3d.npz") == medmnist_md5("adrenalmnist3d", 28)
    assert md5_of(medmnist / "adrenalmnist3d_64.npz") == medmnist_md5("adrenalmnist3d", 64)


# ------------------------------------------------------------------------------------------
# The scripts
# ------------------------------------------------------------------------------------------

CHECKS = {
    "download_msd": ([], MSD),
    "download_medmnist": (["--flag", "adrenalmnist3d", "--size", "28", "64"], MEDMNIST),
    "download_mednist": ([], MEDNIST),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_script_check_passes_on_the_shared_copy_and_fails_on_a_broken_one(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, folder = CHECKS[name]
    main = _script(name).main
    assert main([*args, "--check", str(_shared(folder))]) == 0
    out = capsys.readouterr().out
    assert "layout OK" in out and f"data.root={folder.resolve()}" in out
    broken = tmp_path / "broken"
    (broken / "OnlyClass").mkdir(parents=True)
    (broken / "OnlyClass" / "a.jpg").write_bytes(b"x")
    (broken / "adrenalmnist3d.npz").write_bytes(b"x")
    assert main([*args, "--check", str(broken)]) == 1
    assert "layout problems:" in capsys.readouterr().out


def test_scripts_download_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tar, n_junk = _msd_tar(tmp_path, "Task04_Hippocampus")
    monkeypatch.setattr(msd_download, "MSD_URL", f"file://{tmp_path}/{{task}}.tar")
    monkeypatch.setitem(MSD_MD5, "Task04_Hippocampus", _md5(tar))
    assert _script("download_msd").main(["--out", str(tmp_path / "msd"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"removed {n_junk} macOS '._' junk file(s)" in out
    assert f"data.root={tmp_path / 'msd' / 'Task04_Hippocampus'}" in out

    zipped = _class_archive(tmp_path, "MedNIST_64x64_500", ".jpg", "zip", {})
    source = ArchiveSource(zipped.as_uri(), _md5(zipped), zipped.name, "MedNIST_64x64_500")
    monkeypatch.setitem(MEDNIST_SOURCES, "rsna-64x64-500", source)
    assert _script("download_mednist").main(["--out", str(tmp_path / "mednist"), "--quiet"]) == 0
    assert "3 class folder(s), 9 images" in capsys.readouterr().out

    medmnist = _script("download_medmnist").main
    assert medmnist(["--out", str(tmp_path / "m"), "--flag", "newmnist3d", "--quiet"]) == 1
    assert "no published MD5 is known here for newmnist3d.npz" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
