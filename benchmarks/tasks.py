"""Task metrics for the quantization benchmark: small pure-numpy functions, one per measure.

    OCR (PP-OCRv4 rec)   ocr_characters(model), ctc_greedy_decode(probs, characters),
                         character_accuracy(predicted, truth)
    detection (YOLOv8n)  yolo_detections(output), detection_f1(reference, predicted)
    embeddings (MiniLM)  mean_pooled(hidden, mask), cosines(a, b), nearest_neighbour_agreement(a, b)

Conventions are the ones the models' own packages use: rapidocr's CTC decoding (index 0 is the blank,
then the model's `character` metadata lines, then a space; repeats collapsed, blanks dropped) and
nudenet's YOLOv8 post-processing (output [1, 4 + classes, anchors] with centre-x, centre-y, width,
height; class score >= 0.25, class-agnostic NMS at IoU 0.45).
"""

from __future__ import annotations

import numpy as np
import onnx

CTC_BLANK = "<blank>"
YOLO_SCORE = 0.25
YOLO_NMS_IOU = 0.45
MATCH_IOU = 0.5


# --- OCR ---------------------------------------------------------------------------------------------

def ocr_characters(model: onnx.ModelProto) -> list[str]:
    """The CTC alphabet of a PaddleOCR recognizer: blank, the `character` metadata lines, a space."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ValueError("the model carries no `character` metadata (not a PaddleOCR/rapidocr recognizer?)")
    return [CTC_BLANK, *meta["character"].splitlines(), " "]


def ctc_greedy_decode(probs: np.ndarray, characters: list[str]) -> list[str]:
    """Best path decoding of [N, T, C] (or [T, C]) class scores: argmax per step, repeats collapsed, blank
    (index 0) dropped."""
    probs = probs[None] if probs.ndim == 2 else probs
    if probs.shape[-1] != len(characters):
        raise ValueError(f"{probs.shape[-1]} classes in the output but {len(characters)} characters")
    texts = []
    for best in probs.argmax(axis=-1):
        keep = np.ones(best.shape, bool)
        keep[1:] = best[1:] != best[:-1]
        keep &= best != 0
        texts.append("".join(characters[i] for i in best[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_accuracy(predicted: list[str], truth: list[str]) -> float:
    """1 - (sum of edit distances) / (sum of truth lengths), over all lines together."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} lines")
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth))
    return 1.0 - errors / max(1, sum(len(t) for t in truth))


# --- detection ---------------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of corner boxes a [N, 4] and b [M, 4] (x1, y1, x2, y2)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[box_iou(boxes[best][None], boxes[order])[0] <= iou]
    return np.array(keep, np.int64)


def yolo_detections(output: np.ndarray, score: float = YOLO_SCORE, iou: float = YOLO_NMS_IOU) -> np.ndarray:
    """Detections of one image from a YOLOv8 head [1, 4 + classes, anchors]: rows (x1, y1, x2, y2, score,
    class), after the score threshold and class-agnostic NMS (as nudenet does)."""
    if output.ndim != 3 or output.shape[0] != 1 or output.shape[1] <= 4:
        raise ValueError(f"expected a YOLOv8 output [1, 4 + classes, anchors], got {output.shape}")
    rows = output[0].T
    class_scores = rows[:, 4:]
    best = class_scores.max(axis=1)
    rows, best, classes = rows[best >= score], best[best >= score], class_scores[best >= score].argmax(axis=1)
    centre, size = rows[:, :2], rows[:, 2:4]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    kept = nms(boxes, best, iou)
    return np.concatenate([boxes[kept], best[kept, None], classes[kept, None].astype(boxes.dtype)], axis=1).reshape(-1, 6)


def match_count(reference: np.ndarray, predicted: np.ndarray, iou: float = MATCH_IOU) -> int:
    """Detections of `predicted` matched one-to-one to `reference` (same class, IoU >= iou), greedily by
    predicted score."""
    if not len(reference) or not len(predicted):
        return 0
    overlap = box_iou(predicted[:, :4], reference[:, :4])
    overlap[predicted[:, 5][:, None] != reference[:, 5][None, :]] = 0.0
    free, matched = np.ones(len(reference), bool), 0
    for p in np.argsort(-predicted[:, 4], kind="stable"):
        candidates = np.where(free & (overlap[p] >= iou))[0]
        if candidates.size:
            free[candidates[np.argmax(overlap[p, candidates])]] = False
            matched += 1
    return matched


def detection_f1(reference: list[np.ndarray], predicted: list[np.ndarray], iou: float = MATCH_IOU) -> float:
    """F1 of the predicted detections against the reference ones (per image lists), over all images:
    2 * matched / (reference count + predicted count); 1.0 when neither has any."""
    matched = sum(match_count(r, p, iou) for r, p in zip(reference, predicted, strict=True))
    total = sum(len(r) for r in reference) + sum(len(p) for p in predicted)
    return 1.0 if total == 0 else 2.0 * matched / total


# --- embeddings --------------------------------------------------------------------------------------

def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings [N, H]: the mean of token states [N, T, H] over the tokens where mask [N, T] is 1."""
    weights = mask.astype(np.float64)[..., None]
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [N, H] arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar other row."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def nearest_neighbour_agreement(reference: np.ndarray, embeddings: np.ndarray) -> float:
    """Fraction of rows whose nearest neighbour (among the same rows) is the one the reference gives."""
    return float(np.mean(nearest_neighbours(reference) == nearest_neighbours(embeddings)))
