"""Code shared by `train` and `serve`.

Both scripts must turn an image into exactly the same numbers, so image
decoding, feature extraction and prediction live here and nowhere else.
"""

import base64
import io
import json
import math
import os
import pickle

import numpy as np
from PIL import Image

MODEL_FILE = "model.pkl"  # the fitted scikit-learn objects
META_FILE = "model.json"  # labels and feature settings, readable without pickle
IMAGE_FORMATS = ("PNG", "JPEG")
BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST
BLUR_RADII = (1, 3)  # neighbourhood windows (radius in pixels) of the per-pixel features


class UserError(Exception):
    """A problem the user can fix (bad data or settings); its text is shown as is."""


# ---------------------------------------------------------------- paths

def sm_paths():
    """Every folder comes from the SageMaker env var, with the SageMaker default."""
    env = os.environ.get
    return {
        "config": env("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config"),
        "train": env("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train"),
        "validation": env("SM_CHANNEL_VALIDATION", "/opt/ml/input/data/validation"),
        "model": env("SM_MODEL_DIR", "/opt/ml/model"),
        "output": env("SM_OUTPUT_DIR", "/opt/ml/output"),
    }


def resolve_in(folder, relative, what):
    """Join a manifest path to its channel folder, refusing paths that escape it."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise UserError(f"{what} must be a relative path inside the channel, got {relative!r}.")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise UserError(f"{what} {relative!r} points outside the channel folder.")
    if not os.path.isfile(path):
        raise UserError(f"{what} {relative!r} does not exist in {folder}.")
    return path


# ---------------------------------------------------------------- channels

def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} is missing: {path}.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} ({path}) is not valid JSON: {e}.") from None


def parse_labels(dataset, where):
    """Labels sorted by their stable index; the position in this list is the class id."""
    labels = dataset.get("labels")
    if not isinstance(labels, list) or not labels:
        raise UserError(f"{where}: 'labels' must be a non-empty list.")
    out = []
    for item in labels:
        name = item.get("name") if isinstance(item, dict) else None
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or type(index) is not int or index < 0:
            raise UserError(f"{where}: each label needs a 'name' string and a non-negative "
                            f"integer 'index', got {item!r}.")
        out.append({"name": name, "index": index})
    out.sort(key=lambda label: label["index"])
    for key in ("name", "index"):
        values = [label[key] for label in out]
        if len(set(values)) != len(values):
            raise UserError(f"{where}: label {key}s must be unique.")
    return out


def load_channel(folder, name):
    """Read dataset.json and manifest.jsonl of one channel, checking what we rely on."""
    dataset = read_json(os.path.join(folder, "dataset.json"), f"{name} channel dataset.json")
    if not isinstance(dataset, dict):
        raise UserError(f"{name} channel dataset.json must be a JSON object.")
    problem = dataset.get("problemType")
    if problem not in ("imgClassification", "imgSeg"):
        raise UserError(f"{name} channel: problemType must be 'imgClassification' or 'imgSeg', "
                        f"got {problem!r}.")
    multi = dataset.get("multiLabel", False)
    if not isinstance(multi, bool):
        raise UserError(f"{name} channel: multiLabel must be true or false, got {multi!r}.")
    labels = parse_labels(dataset, f"{name} channel dataset.json")

    manifest = os.path.join(folder, "manifest.jsonl")
    examples = []
    try:
        with open(manifest, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise UserError(f"{name} channel manifest.jsonl is missing: {manifest}.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} channel manifest.jsonl line {number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{where} is not valid JSON.") from None
        if not isinstance(row, dict):
            raise UserError(f"{where} must be a JSON object.")
        names = row.get("labels") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}: 'labels' must be a list of label names.")
        mask = row.get("mask")
        examples.append({
            "id": str(row.get("id", number)),
            "where": where,
            "image": resolve_in(folder, row.get("image"), f"{where}: image"),
            "labels": names,
            "mask": None if mask is None else resolve_in(folder, mask, f"{where}: mask"),
        })
    if not examples:
        raise UserError(f"{name} channel manifest.jsonl has no examples.")
    return {"problemType": problem, "multiLabel": multi, "labels": labels, "examples": examples}


# ---------------------------------------------------------------- images

def open_image(data):
    """Decode PNG/JPEG bytes (or a file path) fully, so corrupt files fail here."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        img = Image.open(source, formats=IMAGE_FORMATS)
        img.load()
    except Image.DecompressionBombError:
        raise UserError("image has too many pixels") from None
    except Exception:  # PIL raises many types for bad input; all mean the same to us
        raise UserError("image is not a readable PNG/JPEG") from None
    return img


def to_color(img, color):
    """Convert any mode to 'L' or 'RGB'; 16-bit and float images are scaled to 8 bits."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float32)
        if a.max() > 255:
            a = a * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img.convert("L" if color == "gray" else "RGB")


def as_array(img, size, resample=BILINEAR):
    """Resize to size x size and scale to [0, 1], always with a channel axis."""
    a = np.asarray(img.resize((size, size), resample), dtype=np.float32) / 255.0
    return a[:, :, None] if a.ndim == 2 else a


def image_features(img, settings):
    """Whole-image features for the image-level classifier: the resized pixels."""
    return as_array(to_color(img, settings["color"]), settings["image_size"]).ravel()


def box_mean(a, r):
    """Mean over the (2r+1)^2 window around each pixel, clipped at the image border,
    via a summed-area table (fast, no scipy needed). a: (h, w, channels)."""
    h, w = a.shape[:2]
    table = np.zeros((h + 1, w + 1, a.shape[2]))
    table[1:, 1:] = a.cumsum(0).cumsum(1)
    top, bottom = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    left, right = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    total = (table[bottom][:, right] - table[top][:, right]
             - table[bottom][:, left] + table[top][:, left])
    area = np.outer(bottom - top, right - left)[:, :, None]
    return (total / area).astype(np.float32)


def pixel_features(img, settings):
    """Per-pixel features at seg_size x seg_size: the pixel, the mean and standard
    deviation (texture) of its neighbourhood, and the image's mean, so a linear model
    can threshold relative to the image's brightness. Returns (seg_size^2, n)."""
    a = as_array(to_color(img, settings["color"]), settings["seg_size"])
    parts = [a]
    c = a.shape[2]
    for r in BLUR_RADII:
        both = box_mean(np.concatenate([a, a * a], axis=2), r)  # E[x] and E[x^2] at once
        mean = both[:, :, :c]
        parts += [mean, np.sqrt(np.maximum(both[:, :, c:] - mean * mean, 0.0))]
    parts.append(np.broadcast_to(a.mean(axis=(0, 1)), a.shape))
    return np.concatenate(parts, axis=2).reshape(-1, len(parts) * c)


def read_mask(path, size, where):
    """A mask as a uint8 array (values above 255 clipped); it must match its image's
    (width, height)."""
    try:
        m = Image.open(path, formats=("PNG",))
        m.load()
    except Exception:
        raise UserError(f"{where}: mask is not a readable PNG.") from None
    if m.size != size:
        raise UserError(f"{where}: mask is {m.size[0]}x{m.size[1]} but its image is "
                        f"{size[0]}x{size[1]}; they must be the same size.")
    a = np.asarray(m)
    return np.minimum(a[:, :, 0] if a.ndim == 3 else a, 255).astype(np.uint8)


def encode_png_b64(mask):
    """A uint8 mask as base64 PNG (mode L), the form the server returns."""
    out = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), "L").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


# ---------------------------------------------------------------- prediction

def class_probabilities(model, meta, X):
    """(n, n_labels) probabilities; independent per label when multi-label."""
    if model["classifier"] is None:  # a single-label segmentation dataset with one class
        return np.ones((len(X), 1))
    p = model["classifier"].predict_proba(model["scaler"].transform(X))
    if meta["multiLabel"] and len(meta["labels"]) == 1:
        p = p[:, 1:]  # trained as plain binary: keep P(label present)
    return p


def foreground(model, P):
    """Boolean foreground per pixel row of P."""
    return model["pixel_classifier"].predict(model["pixel_scaler"].transform(P)) == 1


def compose_mask(fg_small, class_pos, meta, size):
    """Foreground x (label index + 1) at working size, resized back with NEAREST."""
    value = meta["labels"][class_pos]["index"] + 1
    s = meta["seg_size"]
    small = fg_small.reshape(s, s).astype(np.uint8) * value
    return np.asarray(Image.fromarray(small, "L").resize(size, NEAREST))


def save_model(folder, model, meta):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
        pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def load_model(folder):
    """Load what `train` wrote. Pickle is only safe because we wrote it ourselves."""
    with open(os.path.join(folder, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(folder, MODEL_FILE), "rb") as f:
        model = pickle.load(f)
    return model, meta


def plain(x, digits=6):
    """A metric as a plain decimal: no exponent, never nan/inf (pml parses it by regex)."""
    x = float(x)
    return f"{(x if math.isfinite(x) else 0.0):.{digits}f}"
