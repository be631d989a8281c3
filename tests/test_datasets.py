"""Every reader on a small file in its exact on-disk format, malformed rows, detection, matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from captionkit.datasets import (
    DatasetError,
    detect_format,
    find_images,
    image_key,
    load_dataset,
    match_images,
    read_predictions,
    read_references,
)
from captionkit.errors import InputError, OptionError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


KAGGLE_FLICKR8K = """image,caption
1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs in an entry way .
1000268201_693b08cb0e.jpg,A girl going into a wooden building .
1001773457_577c3a7d70.jpg,"A black dog and a spotted dog are fighting , playing ."
1001773457_577c3a7d70.jpg,A black dog and a tri-colored dog playing with each other on the road .
"""

FLICKR8K_TOKEN = (
    "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs .\n"
    "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
    "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
    "1001773457_577c3a7d70.jpg#1\tTwo dogs on pavement moving toward each other .\n"
    "1002674143_1b742ab4b8.jpg#0\tA little girl covered in paint sits in front of a rainbow .\n"
)

FLICKR30K_RESULTS = """image_name| comment_number| comment
1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .
1000092795.jpg| 1| Two young , White males are outside near many bushes .
10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .
2199200615.jpg| 4 A dog runs across the grass .
10002456.jpg| 1| Workers look down from up above on a piece of equipment .
"""


def test_kaggle_flickr8k_captions_txt_is_csv_with_quoted_commas(tmp_path):
    path = write(tmp_path / "captions.txt", KAGGLE_FLICKR8K)
    assert detect_format(path) == "csv"
    refs = read_references(path)
    assert list(refs.captions) == ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"]
    assert refs.captions["1001773457_577c3a7d70.jpg"][0] == \
        "A black dog and a spotted dog are fighting , playing ."
    assert refs.problems == []


def test_flickr8k_token_with_split_list(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", FLICKR8K_TOKEN)
    split = write(tmp_path / "Flickr_8k.testImages.txt",
                  "1001773457_577c3a7d70.jpg\n1002674143_1b742ab4b8.jpg\nmissing.jpg\n\n")
    assert detect_format(path) == "flickr8k-token"
    refs = read_references(path, split_file=split)
    assert list(refs.captions) == ["1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]
    assert len(refs.captions["1001773457_577c3a7d70.jpg"]) == 2
    assert refs.problems == [f"{split}: missing.jpg is listed but has no reference captions"]
    assert len(read_references(path).captions) == 3


def test_flickr8k_token_malformed_rows_name_file_and_line(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt",
                 FLICKR8K_TOKEN + "broken line without a tab\n1002674143_1b742ab4b8.jpg\tno index\n")
    refs = read_references(path)
    assert refs.problems == [
        f"{path}:6: expected `image.jpg#N<TAB>caption`",
        f"{path}:7: expected `image.jpg#N<TAB>caption`",
    ]
    assert sum(len(c) for c in refs.captions.values()) == 5


def test_flickr30k_results_csv_reports_its_real_malformed_row(tmp_path):
    path = write(tmp_path / "results.csv", FLICKR30K_RESULTS)
    assert detect_format(path) == "flickr30k-csv"
    refs = read_references(path)
    assert refs.captions["10002456.jpg"] == [
        "Several men in hard hats are operating a giant pulley system .",
        "Workers look down from up above on a piece of equipment .",
    ]
    assert refs.problems == [f"{path}:5: expected `image.jpg| N| caption`"]
    assert "2199200615.jpg" not in refs.captions


COCO = {
    "info": {"description": "COCO 2014"},
    "images": [
        {"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640},
        {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640},
    ],
    "annotations": [
        {"image_id": 391895, "id": 1, "caption": "A man with a red helmet on a small moped."},
        {"image_id": 522418, "id": 2, "caption": "A woman wearing a net on her head cutting a cake."},
        {"image_id": 391895, "id": 3, "caption": "Man riding a motor bike on a dirt road."},
        {"image_id": 999, "id": 4, "caption": "An orphan caption."},
    ],
}


def test_coco_captions_json(tmp_path):
    path = write(tmp_path / "captions_val2014.json", json.dumps(COCO))
    refs = read_references(path)
    assert refs.fmt == "coco"
    assert refs.captions["COCO_val2014_000000391895.jpg"] == [
        "A man with a red helmet on a small moped.", "Man riding a motor bike on a dirt road."]
    assert refs.ids == {391895: "COCO_val2014_000000391895.jpg",
                        522418: "COCO_val2014_000000522418.jpg"}
    assert refs.problems == [f"{path}: annotations[3]: image_id 999 is not in `images`"]


def test_coco_repeated_image_id_is_a_problem_not_a_silent_move(tmp_path):
    path = write(tmp_path / "coco.json", json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
         "annotations": [{"image_id": 1, "caption": "a man riding a moped"}]}))
    refs = read_references(path)
    assert refs.captions == {"a.jpg": ["a man riding a moped"]}
    assert refs.ids == {1: "a.jpg"}
    assert refs.problems == [f"{path}: images[1]: id 1 of b.jpg is already images[0]'s (a.jpg), "
                             "which keeps the captions; image ids must be unique"]


def karpathy(dataset: str, images: list[tuple[str, str, str | None]]) -> dict:
    entries = []
    for index, (filename, split, filepath) in enumerate(images):
        entry = {"filename": filename, "imgid": index, "split": split, "sentids": [2 * index],
                 "sentences": [{"tokens": ["a", "dog"], "raw": f"A dog number {index}.",
                                "imgid": index, "sentid": 2 * index},
                               {"tokens": ["a", "cat"], "raw": "A cat.", "imgid": index,
                                "sentid": 2 * index + 1}]}
        if filepath:
            entry["filepath"] = filepath
            entry["cocoid"] = 1000 + index
        entries.append(entry)
    return {"images": entries, "dataset": dataset}


@pytest.mark.parametrize(("data", "says"), [
    ({"images": [{"id": [1], "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
      "annotations": [{"image_id": 2, "caption": "a bowl"}]}, "images[0]: `id` must be a number, not [1]"),
    ({"images": [{"id": 2, "file_name": "b.jpg"}],
      "annotations": [{"image_id": [3], "caption": "x"}, {"image_id": 2, "caption": "a bowl"}]},
     "annotations[0]: `image_id` must be a number, not [3]"),
    *(({"dataset": "x", "images": [{"filename": "a.jpg", "sentences": [{"raw": "a man"}], **bad},
                                   {"filename": "b.jpg", "sentences": [{"raw": "a bowl"}]}]},
       f"images[0]: {says}") for bad, says in [
        ({"sentences": 5}, "`sentences` must be a list, not 5"),
        ({"split": ["test"]}, "`split` must be a string, not ['test']"),
        ({"filepath": 5}, "`filepath` must be a string, not 5"),
        ({"cocoid": [1]}, "`cocoid` must be a number, not [1]")]),
])
def test_json_of_the_wrong_shape_is_a_problem_row_not_a_crash(tmp_path, data, says):
    path = write(tmp_path / "refs.json", json.dumps(data))
    refs = read_references(path)
    assert list(refs.captions) == ["b.jpg"]
    assert refs.problems == [f"{path}: {says}"]


def test_coco_results_with_a_list_id_and_deep_json_are_reported(tmp_path):
    results = write(tmp_path / "res.json", json.dumps(
        [{"image_id": [2], "caption": "x"}, {"image_id": 1, "caption": "a man"}]))
    predictions = read_predictions(results, ids={1: "a.jpg"})
    assert predictions.captions == {"a.jpg": "a man"}
    assert predictions.problems == [f"{results}: entry 0: `image_id` must be a number, not [2]"]
    deep = write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match=r"deep.json: JSON nested too deeply to read$"):
        read_references(deep)
    lines = write(tmp_path / "p.jsonl", "[" * 100_000 + "\n" + '{"image": "a.jpg", "caption": "x"}\n')
    assert read_predictions(lines).problems == [f"{lines}:1: JSON nested too deeply to read"]


def test_karpathy_coco_split_ids_and_folders(tmp_path):
    data = karpathy("coco", [("COCO_val2014_000000000001.jpg", "test", "val2014"),
                             ("COCO_train2014_000000000002.jpg", "train", "train2014"),
                             ("COCO_val2014_000000000003.jpg", "restval", "val2014")])
    path = write(tmp_path / "dataset_coco.json", json.dumps(data))
    refs = read_references(path, split="test")
    assert refs.fmt == "karpathy-coco"
    assert refs.captions == {"COCO_val2014_000000000001.jpg": ["A dog number 0.", "A cat."]}
    assert refs.ids == {1000: "COCO_val2014_000000000001.jpg"}
    assert refs.folders == {"COCO_val2014_000000000001.jpg": "val2014"}
    assert len(read_references(path).captions) == 3
    with pytest.raises(OptionError, match="restval, test, train"):
        read_references(path, split="dev")


@pytest.mark.parametrize("dataset", ["flickr8k", "flickr30k"])
def test_karpathy_flickr(tmp_path, dataset):
    data = karpathy(dataset, [("1.jpg", "train", None), ("2.jpg", "val", None),
                              ("3.jpg", "test", None)])
    data["images"][1]["sentences"] = []
    path = write(tmp_path / f"dataset_{dataset}.json", json.dumps(data))
    refs = read_references(path, split="test")
    assert list(refs.captions) == ["3.jpg"]
    assert refs.problems == [f"{path}: images[1]: needs `sentences` with a `raw` caption each"]


def test_generic_csv_jsonl_and_captions_txt_references(tmp_path):
    csv_path = write(tmp_path / "refs.csv", 'image,caption\na.jpg,"one, with comma"\na.jpg,two\n'
                                            "b.jpg,\n")
    refs = read_references(csv_path)
    assert refs.captions == {"a.jpg": ["one, with comma", "two"]}
    assert refs.problems == [f"{csv_path}:4: empty image name or caption"]

    jsonl = write(tmp_path / "refs.jsonl", '{"image": "a.jpg", "caption": "one"}\n'
                                           '{"image": "b.jpg", "caption": ["two", "three"]}\n'
                                           "\n{not json\n"
                                           '{"image": "c.jpg"}\n')
    refs = read_references(jsonl)
    assert refs.captions == {"a.jpg": ["one"], "b.jpg": ["two", "three"]}
    assert [p.split(": ")[0] for p in refs.problems] == [f"{jsonl}:4", f"{jsonl}:5"]

    txt = write(tmp_path / "refs.txt", "a.jpg: one: with colon\na.jpg: two\nno separator\n")
    assert detect_format(txt) == "captions.txt"
    refs = read_references(txt)
    assert refs.captions == {"a.jpg": ["one: with colon", "two"]}
    assert refs.problems == [f"{txt}:3: expected `image.jpg: caption`"]


def test_sidecar_folder_references(tmp_path):
    image(tmp_path / "set" / "a.jpg")
    write(tmp_path / "set" / "a.txt", "a red square\n\nsomething red\n")
    image(tmp_path / "set" / "sub" / "b.png")
    write(tmp_path / "set" / "sub" / "b.txt", "another red square")
    write(tmp_path / "set" / "sub" / "c.txt", "  \n")
    (tmp_path / "set" / "sub" / "d.txt").write_bytes(b"caf\xe9")
    refs = read_references(tmp_path / "set")
    assert refs.fmt == "sidecars"
    assert refs.captions == {"a.jpg": ["a red square", "something red"],
                             "b.png": ["another red square"]}
    sub = tmp_path / "set" / "sub"
    assert refs.problems == [f"{sub / 'c.txt'}: empty caption file",
                             f"{sub / 'd.txt'}: unreadable ({sub / 'd.txt'}:1: not UTF-8 text; "
                             "save the file as UTF-8)"]
    assert refs.image_paths()["b.png"] == tmp_path / "set" / "sub" / "b.png"


def test_unreadable_files_raise_dataset_error_with_line(tmp_path):
    bad_json = write(tmp_path / "captions_val2014.json", '{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"captions_val2014.json:2: invalid JSON"):
        read_references(bad_json)
    latin1 = tmp_path / "refs.txt"
    latin1.write_bytes(b"a.jpg: fine\nb.jpg: caf\xe9\n")
    with pytest.raises(DatasetError, match=r"refs.txt:2: not UTF-8"):
        read_references(latin1)
    with pytest.raises(DatasetError, match="no such file"):
        read_references(tmp_path / "absent.txt")
    unknown = write(tmp_path / "notes.txt", "just some words\n")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        read_references(unknown)
    blank = write(tmp_path / "blank.txt", "\n  \n")
    with pytest.raises(DatasetError, match=r"blank.txt: no captions in it \(empty, or only blank lines\)"):
        read_references(blank)
    assert issubclass(DatasetError, InputError)


def test_rows_that_are_all_bad_raise_with_the_first_problem(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", "x.jpg#0 caption without tab\n")
    detected = write(tmp_path / "other.txt", "x.jpg#0\tfine\n")
    assert detect_format(detected) == "flickr8k-token"
    with pytest.raises(DatasetError, match=r"no usable reference captions; first problem: .*:1:"):
        read_references(path, fmt="flickr8k-token")


def test_split_on_a_format_without_splits_asks_for_a_split_file(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", FLICKR8K_TOKEN)
    with pytest.raises(OptionError, match="Flickr_8k.testImages.txt"):
        read_references(path, split="test")


def test_predictions_captions_txt_splits_on_first_colon_space(tmp_path):
    path = write(tmp_path / "out" / "captions.txt",
                 "photos/a.jpg: a sign that says: stop\nb.jpg: a cat\n")
    predictions = read_predictions(path)
    assert predictions.captions == {"a.jpg": "a sign that says: stop", "b.jpg": "a cat"}


def test_predictions_captionkit_jsonl_and_csv_report_failed_images(tmp_path):
    jsonl = write(tmp_path / "captions.jsonl", "\n".join(json.dumps(r) for r in [
        {"image": "a.jpg", "path": "/x/a.jpg", "status": "done", "caption": "a dog", "error": None},
        {"image": "b.jpg", "path": "/x/b.jpg", "status": "failed", "caption": None,
         "error": "truncated file"},
    ]) + "\n")
    predictions = read_predictions(jsonl)
    assert predictions.captions == {"a.jpg": "a dog"}
    assert predictions.problems == [f"{jsonl}:2: captioning failed: truncated file"]

    csv_path = write(tmp_path / "captions.csv",
                     "image,caption,status,error,model,hash,seconds,path\n"
                     "a.jpg,a dog,done,,m,h,0.1,/x/a.jpg\n"
                     "b.jpg,,failed,truncated file,m,h,0.1,/x/b.jpg\n")
    predictions = read_predictions(csv_path)
    assert predictions.captions == {"a.jpg": "a dog"}
    assert predictions.problems == [f"{csv_path}:3: captioning failed: truncated file"]


def test_predictions_conflicting_duplicates_are_reported(tmp_path):
    path = write(tmp_path / "captions.txt", "a.jpg: one\nsub/a.jpg: two\na.jpg: one\n")
    predictions = read_predictions(path)
    assert predictions.captions == {"a.jpg": "one"}
    assert predictions.problems == [
        f"{path}:2: a second, different caption for a.jpg (first at {path}:1); the first is kept"]


def test_predictions_coco_results_resolve_ids_through_references(tmp_path):
    refs = read_references(write(tmp_path / "captions_val2014.json", json.dumps(COCO)))
    results = write(tmp_path / "results.json", json.dumps([
        {"image_id": 391895, "caption": "a man on a moped"},
        {"image_id": 522418, "caption": "a woman cutting a cake"},
        {"image_id": 7, "caption": "unknown"},
    ]))
    predictions = read_predictions(results, ids=refs.ids)
    assert predictions.captions == {"COCO_val2014_000000391895.jpg": "a man on a moped",
                                    "COCO_val2014_000000522418.jpg": "a woman cutting a cake"}
    assert predictions.problems == [f"{results}: entry 2: image_id 7 is not in the references"]
    assert read_predictions(results).captions["391895"] == "a man on a moped"


def test_predictions_sidecars_mirrored_without_images(tmp_path):
    write(tmp_path / "out" / "sub" / "a.txt", "a red square\n")
    write(tmp_path / "out" / "b.jpg.txt", "a blue square\n")
    write(tmp_path / "out" / "captions.txt", "sub/a.jpg: a red square\n")
    predictions = read_predictions(tmp_path / "out")
    assert predictions.captions == {"a": "a red square", "b.jpg": "a blue square"}
    assert match_images(predictions.captions, ["a.jpg", "b.jpg", "c.jpg"]) == \
        {"a": "a.jpg", "b.jpg": "b.jpg"}


def test_name_matching_rule():
    assert image_key("val2014/COCO_val2014_000000391895.jpg") == "COCO_val2014_000000391895.jpg"
    assert image_key(r"C:\photos\Dog.JPG") == "Dog.JPG"
    assert image_key(r"\\server\share\Dog.JPG") == "Dog.JPG"
    assert image_key(r"photos/we\ird.jpg") == r"we\ird.jpg", "a backslash is a name's own on Linux"
    # Case and extension count; a bare stem matches only when one reference has it.
    assert match_images(["A.jpg", "b", "c.png", "d"],
                        ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "d.png"]) == {"b": "b.jpg"}
    assert match_images(["a", "a.jpg"], ["a.jpg"]) == {"a.jpg": "a.jpg"}


def test_references_keep_names_with_a_backslash_apart(tmp_path):
    write(tmp_path / "refs.csv", "image,caption\nwe\\ird.jpg,a cat\nother\\ird.jpg,a rocket\n")
    refs = read_references(tmp_path / "refs.csv")
    assert refs.problems == []
    assert refs.captions == {"we\\ird.jpg": ["a cat"], "other\\ird.jpg": ["a rocket"]}


def test_load_dataset_flickr8k_native_files(tmp_path):
    write(tmp_path / "Flickr8k_text" / "Flickr8k.token.txt", FLICKR8K_TOKEN)
    write(tmp_path / "Flickr8k_text" / "Flickr_8k.testImages.txt", "1002674143_1b742ab4b8.jpg\n")
    write(tmp_path / "Flickr8k_text" / "Flickr_8k.devImages.txt", "1000268201_693b08cb0e.jpg\n")
    image(tmp_path / "Flicker8k_Dataset" / "1002674143_1b742ab4b8.jpg")
    refs = load_dataset("flickr8k", tmp_path, "test")
    assert list(refs.captions) == ["1002674143_1b742ab4b8.jpg"]
    assert refs.root == tmp_path / "Flicker8k_Dataset"
    assert refs.image_paths()["1002674143_1b742ab4b8.jpg"].is_file()
    with pytest.raises(DatasetError, match="no image folder holds 1000268201_693b08cb0e.jpg"):
        load_dataset("flickr8k", tmp_path, "val")


def test_load_dataset_prefers_karpathy_and_finds_kaggle_nesting(tmp_path):
    data = karpathy("flickr30k", [("1000092795.jpg", "test", None), ("10002456.jpg", "train",
                                                                     None)])
    write(tmp_path / "caption_datasets" / "dataset_flickr30k.json", json.dumps(data))
    write(tmp_path / "results.csv", FLICKR30K_RESULTS)
    image(tmp_path / "flickr30k_images" / "flickr30k_images" / "1000092795.jpg")
    refs = load_dataset("flickr30k", tmp_path, "test")
    assert refs.fmt == "karpathy-flickr30k"
    assert refs.root == tmp_path / "flickr30k_images" / "flickr30k_images"


def test_load_dataset_coco_native_and_karpathy(tmp_path):
    write(tmp_path / "annotations" / "captions_val2014.json", json.dumps(COCO))
    image(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    refs = load_dataset("coco", tmp_path, "val")
    assert refs.root == tmp_path / "val2014" and len(refs.captions) == 2
    with pytest.raises(DatasetError, match="captions_test2014.json"):
        load_dataset("coco", tmp_path, "test")
    data = karpathy("coco", [("COCO_val2014_000000391895.jpg", "test", "val2014")])
    write(tmp_path / "dataset_coco.json", json.dumps(data))
    refs = load_dataset("coco", tmp_path, "test")
    assert refs.root == tmp_path
    assert refs.image_paths() == {"COCO_val2014_000000391895.jpg":
                                  tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"}


def test_load_dataset_errors(tmp_path):
    with pytest.raises(OptionError, match="choose from flickr8k, flickr30k, coco"):
        load_dataset("imagenet", tmp_path, "test")
    with pytest.raises(DatasetError, match="dataset_flickr8k.json, Flickr8k.token.txt"):
        load_dataset("flickr8k", tmp_path, "test")
    write(tmp_path / "captions.txt", KAGGLE_FLICKR8K)
    with pytest.raises(OptionError, match="no 'test' split"):
        load_dataset("flickr8k", tmp_path, "test")
    image(tmp_path / "Images" / "1000268201_693b08cb0e.jpg")
    assert load_dataset("flickr8k", tmp_path, "all").root == tmp_path / "Images"


def test_find_images_looks_in_the_dataset_subfolder_then_directly(tmp_path):
    refs = read_references(write(tmp_path / "refs.jsonl", "\n".join(json.dumps(r) for r in [
        {"image": "val2014/a.jpg", "caption": "a"}, {"image": "b.jpg", "caption": "b"},
        {"image": "val2014/c.jpg", "caption": "c"}])))
    image(tmp_path / "coco" / "val2014" / "a.jpg")
    image(tmp_path / "coco" / "b.jpg")
    image(tmp_path / "flat" / "a.jpg")
    assert find_images(refs, tmp_path / "coco") == {
        "a.jpg": tmp_path / "coco" / "val2014" / "a.jpg", "b.jpg": tmp_path / "coco" / "b.jpg",
        "c.jpg": tmp_path / "coco" / "c.jpg"}
    assert find_images(refs, tmp_path / "flat")["a.jpg"] == tmp_path / "flat" / "a.jpg"
    with pytest.raises(DatasetError, match="none of the 3 referenced images is here"):
        find_images(refs, tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        find_images(refs, tmp_path / "absent")
