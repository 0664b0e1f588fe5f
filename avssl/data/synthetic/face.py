"""Drawn talking faces: identity from the speaker, mouth from visemes and loudness, expression
from emotion. Grayscale, supersampled and box-filtered for smooth edges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Expression offsets at full intensity: brow tilt (+ raises the inner end), brow height,
# eye openness, mouth-corner curve (+ smiles), mouth width factor.
EXPRESSIONS: dict[str, dict[str, float]] = {
    "neutral": dict(brow=0.0, brow_h=0.0, eye=1.0, curve=0.0, mw=1.0),
    "happy": dict(brow=0.1, brow_h=0.05, eye=0.8, curve=0.7, mw=1.15),
    "anger": dict(brow=-0.9, brow_h=-0.10, eye=0.85, curve=-0.3, mw=0.95),
    "fear": dict(brow=0.8, brow_h=0.15, eye=1.35, curve=-0.2, mw=1.05),
    "sad": dict(brow=0.7, brow_h=0.0, eye=0.7, curve=-0.6, mw=0.9),
    "disgust": dict(brow=-0.5, brow_h=-0.05, eye=0.6, curve=-0.4, mw=0.85),
}

# Viseme classes from espeak-ng phoneme mnemonics: (openness 0..1, width factor, rounding 0..1).
_VISEMES: list[tuple[str, tuple[float, float, float]]] = [
    ("pbm", (0.0, 0.95, 0.0)),
    ("fv", (0.12, 1.0, 0.0)),
    ("w", (0.35, 0.65, 1.0)),
    ("r", (0.25, 0.75, 0.6)),
]
_ROUNDED = {"u:", "U", "O:", "oU", "OI", "O@", "U@", "u", "o", "O"}
_OPEN = {"a", "a:", "A:", "aI", "aU", "A@", "V", "0", "a#", "aa", "A"}
_MID = {"E", "e", "eI", "e@", "3:", "@", "@2", "@5", "3", "@L", "I@", "E2"}
REST = (0.0, 1.0, 0.0)


def viseme(phoneme: str) -> tuple[float, float, float]:
    p = phoneme.strip("'\",%=:;")
    if not p or p[0] == "_":
        return REST
    if p in _ROUNDED:
        return (0.35, 0.65, 1.0)
    if p in _OPEN:
        return (1.0, 1.0, 0.0)
    if p in _MID:
        return (0.6, 1.05, 0.0)
    for chars, v in _VISEMES:
        if p[0] in chars:
            return v
    if p[0] in "iIj":
        return (0.3, 1.2, 0.0)
    if p[0] in "TDsztdnlSZ":
        return (0.22, 1.1, 0.0)
    if p[0] in "kgNh":
        return (0.45, 1.0, 0.0)
    return (0.4, 1.0, 0.0)


@dataclass(frozen=True)
class FaceIdentity:
    skin: int
    background: int
    face_w: float
    face_h: float
    eye_dx: float
    eye_y: float
    mouth_y: float
    mouth_w: float
    hair: int
    hair_h: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "FaceIdentity":
        return cls(
            skin=int(rng.uniform(120, 220)),
            background=int(rng.uniform(20, 90)),
            face_w=float(rng.uniform(0.30, 0.40)),
            face_h=float(rng.uniform(0.40, 0.48)),
            eye_dx=float(rng.uniform(0.13, 0.18)),
            eye_y=float(rng.uniform(-0.10, -0.04)),
            mouth_y=float(rng.uniform(0.17, 0.24)),
            mouth_w=float(rng.uniform(0.10, 0.15)),
            hair=int(rng.uniform(0, 80)),
            hair_h=float(rng.uniform(0.05, 0.18)),
        )


def blend_expression(emotion: str, amount: float) -> dict[str, float]:
    """Neutral face moved `amount` of the way (0..~2) towards the emotion's full expression."""
    base, target = EXPRESSIONS["neutral"], EXPRESSIONS[emotion]
    return {k: base[k] + amount * (target[k] - base[k]) for k in base}


_T = np.linspace(-1.0, 1.0, 14)
_LIP_SHAPE = (1.0 - _T**2) ** 0.7


def draw_face(
    who: FaceIdentity,
    expr: dict[str, float],
    openness: float,
    width: float,
    rounding: float,
    blink: float,
    dx: float,
    dy: float,
    size: int,
    supersample: int = 2,
) -> np.ndarray:
    s = size * supersample
    im = Image.new("L", (s, s), who.background)
    d = ImageDraw.Draw(im)
    cx, cy = s / 2 + dx * s, s / 2 + 0.03 * s + dy * s
    fw, fh = who.face_w * s, who.face_h * s
    d.ellipse([cx - fw * 1.04, cy - fh * 1.04 - who.hair_h * s, cx + fw * 1.04, cy + fh * 0.4], fill=who.hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=who.skin)
    dark = max(0, who.skin - 110)
    ey = cy + who.eye_y * s
    eye_open = max(0.05, expr["eye"] * (1.0 - blink))
    ew, eh = 0.055 * s, 0.03 * s * eye_open
    for side in (-1, 1):
        ex = cx + side * who.eye_dx * s
        d.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=245)
        if eye_open > 0.2:
            r = min(eh, 0.022 * s)
            d.ellipse([ex - r, ey - r, ex + r, ey + r], fill=20)
        by = ey - 0.075 * s - expr["brow_h"] * 0.3 * s
        inner = (ex - side * 0.05 * s, by - expr["brow"] * 0.04 * s)
        outer = (ex + side * 0.07 * s, by + expr["brow"] * 0.02 * s)
        d.line([inner, outer], fill=dark, width=max(2, int(0.022 * s)))
    d.line([(cx, ey + 0.04 * s), (cx - 0.02 * s, cy + 0.1 * s), (cx + 0.01 * s, cy + 0.11 * s)], fill=dark + 30, width=supersample)
    my = cy + who.mouth_y * s
    mw = who.mouth_w * s * width * expr["mw"] * (1.0 - 0.35 * rounding)
    mo = openness * 0.09 * s
    lift = -expr["curve"] * 0.035 * s * _T**2
    xs = cx + _T * mw
    upper = my + lift - (0.012 * s + 0.35 * mo) * _LIP_SHAPE
    lower = my + lift + (0.014 * s + 1.0 * mo) * _LIP_SHAPE
    d.polygon(list(zip(xs, upper)) + list(zip(xs[::-1], lower[::-1])), fill=max(0, who.skin - 70))
    if mo > 0.01 * s:
        xs2 = cx + _T * mw * 0.8
        inner_u = my + lift - 0.25 * mo * _LIP_SHAPE
        inner_l = my + lift + 0.8 * mo * _LIP_SHAPE
        d.polygon(list(zip(xs2, inner_u)) + list(zip(xs2[::-1], inner_l[::-1])), fill=25)
    else:
        d.line(list(zip(xs, my + lift)), fill=25, width=supersample)
    if supersample > 1:
        im = im.resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.uint8)
