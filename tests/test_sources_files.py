"""Finding inputs: folder walks, names written to the `image` column, `--from` lists, order, bad input."""

import os
import random

import pandas as pd
import pytest

from iqa_cli.errors import UserError
from iqa_cli.sources.files import PackedStrings, find_inputs, read_path_list


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _names(inputs):
    return list(inputs.names)


def _paths(inputs):
    return [inputs.path(i) for i in range(len(inputs))]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    _touch(
        root,
        "b.jpg",
        "A.JPG",
        "a/z.PNG",
        "a/b/c/deep.webp",
        "a-b.jpeg",
        "naïve café.Jpeg",
        "日本/写真.tiff",
        "x.BMP",
        "y.Tif",
        "notes.txt",
        "model.safetensors",
        ".hidden.jpg",
        ".cache/inside.jpg",
        "a/.thumbs/t.jpg",
        "noext",
    )
    return root


def test_folder_walk_is_recursive_sorted_and_skips_hidden_and_non_images(tree):
    inputs = find_inputs([tree])
    # Depth first, each directory sorted by code point ("A.JPG" < "a" < "a-b.jpeg" < "b.jpg" < ...),
    # so a folder's contents come right after its name.
    assert _names(inputs) == [
        "A.JPG",
        "a/b/c/deep.webp",
        "a/z.PNG",
        "a-b.jpeg",
        "b.jpg",
        "naïve café.Jpeg",
        "x.BMP",
        "y.Tif",
        "日本/写真.tiff",
    ]
    assert _paths(inputs) == [os.path.join(tree, n) for n in _names(inputs)]
    assert all(os.path.isfile(p) for p in _paths(inputs))


def test_order_and_fingerprint_do_not_depend_on_creation_order(tmp_path):
    names = [f"d{i % 3}/img_{i:03d}_é.png" for i in range(40)]
    first, second = tmp_path / "one", tmp_path / "two"
    _touch(first, *names)
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    _touch(second, *shuffled)
    a, b = find_inputs([first]), find_inputs([second])
    assert _names(a) == _names(b) == sorted(names)
    assert a.fingerprint() == b.fingerprint()
    _touch(second, "d0/extra.png")
    assert find_inputs([second]).fingerprint() != a.fingerprint()


def test_unicode_names_sort_by_nfc_form(tmp_path):
    # "é" precomposed (NFC) and decomposed (NFD, as macOS writes it) sort the same way.
    _touch(tmp_path, "e\u0301z.png", "\u00e9a.png", "f.png")
    assert [n.replace("e\u0301", "\u00e9") for n in _names(find_inputs([tmp_path]))] == ["f.png", "éa.png", "éz.png"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_loops_end_and_linked_folders_are_walked_once(tmp_path):
    root = tmp_path / "root"
    _touch(root, "sub/a.png", "other/b.png")
    os.symlink(root, root / "sub" / "loop")  # root/sub/loop -> root
    os.symlink(root / "other", root / "alias")  # a second way into "other"
    os.symlink(tmp_path / "missing.jpg", root / "broken.jpg")  # dangling link: kept, becomes an error row
    names = _names(find_inputs([root]))
    assert names == ["alias/b.png", "broken.jpg", "sub/a.png"]


def test_single_files_are_named_as_given_and_duplicates_collapse(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    inputs = find_inputs(["photos/b.jpg", "photos/x.BMP", "photos/b.jpg", "photos/notes.txt"])
    assert _names(inputs) == ["photos/b.jpg", "photos/x.BMP", "photos/notes.txt"]
    assert inputs.warnings == [
        "1 input(s) were the same file as an earlier input (given twice, a file inside a folder also given, or a "
        "symbolic link) and were scored once, under the earlier name"
    ]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_one_file_reached_twice_is_kept_once_under_its_first_name(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    _touch(root, "a.png", "b.png", "new.png", "sub/c.png")
    os.symlink(root / "a.png", root / "z-link.png")  # a link next to its target, found by the walk
    os.symlink(root / "sub", tmp_path / "sublink")  # a folder reached through a link
    monkeypatch.chdir(tmp_path)
    given = ["photos", "photos/b.png", "./photos/sub/c.png", "sublink/c.png", str(root / "a.png"), "photos/new.png"]
    inputs = find_inputs(given)
    assert _names(inputs) == ["a.png", "b.png", "new.png", "sub/c.png"]
    assert _paths(inputs) == [f"photos/{n}" for n in _names(inputs)]
    assert len(inputs.warnings) == 1 and inputs.warnings[0].startswith("6 input(s) were the same file")

    # A --from list: one file spelled four ways, relative to --root and absolute, or through a linked folder.
    # A hard link is another file, and a listed link to a file is not resolved (one lstat per entry): both kept.
    os.link(root / "b.png", root / "hard.png")
    os.symlink(root, tmp_path / "rootlink")
    listing = tmp_path / "list.txt"
    entries = ["b.png", "./b.png", "sub/../b.png", str(root / "b.png"), str(tmp_path / "rootlink" / "b.png")]
    listing.write_text("\n".join([*entries, "hard.png", "z-link.png", "a.png"]) + "\n")
    inputs = find_inputs(from_file=listing, root=root)
    assert _names(inputs) == ["b.png", "hard.png", "z-link.png", "a.png"]
    assert inputs.warnings[0].startswith("4 input(s) were the same file")


def test_files_that_differ_only_by_hash_are_not_dropped(tmp_path, monkeypatch):
    """Entries are grouped by a hash of the resolved path; equal hashes of different paths keep both."""
    import iqa_cli.sources.files as inputs_module

    _touch(tmp_path, "a.png", "b.png")
    monkeypatch.setattr(inputs_module, "hash", lambda value: 7, raising=False)  # every key collides
    inputs = find_inputs([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "a.png"])
    assert len(inputs) == 2 and inputs.warnings[0].startswith("1 input(s) were the same file")


def test_two_files_with_one_name_are_refused(tmp_path):
    _touch(tmp_path, "a/same.png", "b/same.png")
    with pytest.raises(UserError, match=r"same\.png.*--root"):
        find_inputs([tmp_path / "a", tmp_path / "b"])
    inputs = find_inputs([tmp_path / "a", tmp_path / "b"], root=tmp_path)
    assert _names(inputs) == ["a/same.png", "b/same.png"]


def test_root_names_folder_images_relative_to_it(tree):
    inputs = find_inputs([tree / "a"], root=tree)
    assert _names(inputs) == ["a/b/c/deep.webp", "a/z.PNG"]
    assert _paths(inputs)[1] == os.path.join(os.path.abspath(tree), "a/z.PNG")


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "txt"])
def test_from_lists_keep_list_order_and_resolve_under_root(tree, tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative entries must resolve against --root, not the current folder
    entries = ["b.jpg", "a/z.PNG", "日本/写真.tiff", "missing.png"]
    frame = pd.DataFrame({"mos": [1.0, 2.0, 3.0, 4.0], "image": entries})
    path = tmp_path / f"list.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif kind == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(entries) + "\n\n", encoding="utf-8")
    inputs = find_inputs(from_file=path, root=tree)
    assert _names(inputs) == entries  # exactly as in the list: joins with `iqa prepare` metas
    assert _paths(inputs) == [os.path.join(os.path.abspath(tree), e) for e in entries]


def test_from_list_without_root_resolves_against_the_current_folder(tree, tmp_path, monkeypatch):
    path = tmp_path / "list.txt"
    path.write_text("photos/b.jpg\n" + str(tree / "x.BMP") + "\n")
    monkeypatch.chdir(tmp_path)
    inputs = find_inputs(from_file=path)
    assert _names(inputs) == ["photos/b.jpg", str(tree / "x.BMP")]
    assert all(os.path.isfile(p) for p in _paths(inputs))


def test_from_column_autodetect_and_override(tmp_path):
    path = tmp_path / "meta.csv"
    pd.DataFrame({"Path": ["1.jpg", "2.jpg"], "ref": ["r1.jpg", "r2.jpg"]}).to_csv(path, index=False)
    assert read_path_list(path) == ["1.jpg", "2.jpg"]  # case-insensitive `path`
    assert read_path_list(path, column="ref") == ["r1.jpg", "r2.jpg"]
    with pytest.raises(UserError, match=r"--from-column nope: no such column .*Path, ref"):
        read_path_list(path, column="nope")
    other = tmp_path / "other.csv"
    pd.DataFrame({"a": ["1.jpg"], "b": [1]}).to_csv(other, index=False)
    with pytest.raises(UserError, match=r"no path column .* a, b; name one with --from-column"):
        read_path_list(other)


def test_csv_paths_that_look_like_numbers_or_na_stay_strings(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("image\n0001\nNA\n")
    assert read_path_list(path) == ["0001", "NA"]


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"input not found: .*nope"):
        find_inputs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "empty", "readme.txt", ".hidden.png")
    with pytest.raises(UserError, match=r"no images found in .*empty"):
        find_inputs([tmp_path / "empty"])
    with pytest.raises(UserError, match=r"--from .*list\.csv: file not found"):
        find_inputs(from_file=tmp_path / "list.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text('image,x\na.jpg,1\n"",2\n')
    with pytest.raises(UserError, match="empty in data row 2"):
        find_inputs(from_file=bad)
    with pytest.raises(UserError, match=r"--root .*: not a directory"):
        find_inputs([tmp_path], root=tmp_path / "nope")


def test_packed_strings_round_trip_including_undecodable_names():
    values = ["a.jpg", "", "日本/写真.tiff", "bad\udcff.png"]
    packed = PackedStrings(values)
    assert len(packed) == 4
    assert list(packed) == values
    assert packed[-1] == values[-1]
    with pytest.raises(IndexError):
        packed[4]


def test_a_short_run_has_a_unit_for_every_default_worker_and_a_long_one_few_files():
    """Units are a function of the image count alone; a short run is cut so that each of a rank's default
    DataLoader workers (at most MAX_WORKERS, and the loop starts no more workers than units) gets one, a long
    one into about UNITS_PER_RUN files of at most MAX_FILES_PER_UNIT images."""
    from iqa_cli.process import MAX_WORKERS
    from iqa_cli.sources.files import MAX_FILES_PER_UNIT, MIN_FILES_PER_UNIT, UNITS_PER_RUN, files_per_unit

    for n in [*range(1, 2200), 10**5, 10**6, 10**7]:
        per = files_per_unit(n)
        units = -(-n // per)
        assert units >= min(n, MAX_WORKERS), n  # every worker busy
        assert per <= MAX_FILES_PER_UNIT, n
        if per < MAX_FILES_PER_UNIT:
            assert units <= max(UNITS_PER_RUN, MAX_WORKERS), n  # few files
        if n >= MIN_FILES_PER_UNIT * MAX_WORKERS:
            assert per >= MIN_FILES_PER_UNIT, n  # a unit worth its own file once there are enough images
    assert files_per_unit(16) == 2 and files_per_unit(1000) == 16 and files_per_unit(10**7) == MAX_FILES_PER_UNIT
