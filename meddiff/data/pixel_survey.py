"""What ingest learns about a source's pixels in one pass, and how it is told: the card's ``pixels`` record
(channels and how they were decided, transparency, orientation, pages, DICOM display) and the notes the
command prints and the flow logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from meddiff.data import dicom
from meddiff.data.images import GRAY_MODES, GREY_TOLERANCE, HIGH_BIT_MODES, holds_grey, reoriented, see_through

Colour = Literal["auto", "grey", "rgb"]  # zip/folder/kaggle channels: by content, or forced to 1 / 3
Frames = Literal["first", "all"]  # multi-frame files: the first page (DICOM: skipped), or every frame an image
DICOM_RULE = ("monochrome: modality LUT (CT in HU), then the file's first window (WindowCenter/Width by its "
              "VOILUTFunction) or VOI LUT onto 0..255, else the image's min..max; --window percentiles instead when "
              "given; MONOCHROME1 inverted. Colour: 8-bit RGB. Multi-frame files: each frame by the same rules with "
              "--frames all, else skipped")


FRAME_RULES = {"first": "the first page or frame of a TIFF/GIF is read; a multi-frame DICOM is skipped",
               "all": "every page or frame of a TIFF/GIF/DICOM is an image; a file's frames share one split"}


@dataclass
class PixelSurvey:
    """What one pass over the files found (headers; pixels only where a rule needs them)."""

    colour: Colour
    find_bits: bool  # look for the largest >8-bit integer value (no --bit-depth or --window given)
    frames: Frames = "first"  # multi-frame files: first page (DICOM skipped) or every frame
    high_max: int = -1  # largest value of a >8-bit integer image; -1 = none seen
    deep: bool = False  # some input is deeper than 8 bits
    grey_as_colour: int = 0  # colour-encoded files whose pixels are grey
    first_colour: str | None = None  # the first file holding colour
    transparent: int = 0  # files with a pixel not fully opaque (alpha is dropped)
    rotated: int = 0  # files with an EXIF orientation (applied when read)
    multi_frame: int = 0  # files with several pages or frames (TIFF/GIF; DICOM too with frames="all")
    frame_counts: dict[str, int] = field(default_factory=dict)  # source id → its frames, for files with several
    dicom_display: dict = field(default_factory=dict)  # DICOM files by display rule ("own window", "min..max", …)
    inverted: int = 0  # MONOCHROME1 DICOM files (inverted)

    def see_dicom(self, source_id: str, found: dicom.DicomInfo) -> None:
        self._frames(source_id, found.frames)
        self.dicom_display[found.display] = self.dicom_display.get(found.display, 0) + 1
        self.inverted += found.inverted
        if self.colour == "auto" and self.first_colour is None and not found.grey:
            self.first_colour = source_id

    def see(self, source_id: str, im: Image.Image) -> None:
        if self.colour == "auto" and self.first_colour is None and im.mode not in GRAY_MODES:
            if holds_grey(im):  # decodes: a radiograph saved as RGB is still grey
                self.grey_as_colour += 1
            else:
                self.first_colour = source_id
        self.transparent += see_through(im)
        self.rotated += reoriented(im)
        self._frames(source_id, getattr(im, "n_frames", 1))
        self.deep = self.deep or im.mode in HIGH_BIT_MODES
        if self.find_bits and im.mode in HIGH_BIT_MODES and im.mode != "F":
            self.high_max = max(self.high_max, int(np.asarray(im).max(initial=0)))

    def _frames(self, source_id: str, n: int) -> None:
        if n > 1:
            self.multi_frame += 1
            self.frame_counts[source_id] = n

    @property
    def channels(self) -> int:
        return {"grey": 1, "rgb": 3}.get(self.colour) or (3 if self.first_colour else 1)

    def record(self) -> dict:
        """The card's ``pixels``: channels and how they were decided, transparency, orientation, pages, DICOM."""
        dicom_files = {"files": sum(self.dicom_display.values()), "display": dict(sorted(self.dicom_display.items())),
                       "monochrome1_inverted": self.inverted, "rule": DICOM_RULE}
        found = ({} if self.colour != "auto" else {"first_colour_image": self.first_colour} if self.first_colour
                 else {"grey_stored_as_colour": self.grey_as_colour})
        return {"colour": self.colour, "channels": self.channels, **found,
                "grey_rule": f"auto: a colour-encoded file whose R, G, B agree within {GREY_TOLERANCE} grey levels "
                             "at every pixel is grey",
                "transparent_images": self.transparent, "alpha": "dropped: a transparent pixel keeps its stored colour",
                "exif_rotated_images": self.rotated, "orientation": "EXIF orientation applied (as viewers show)",
                "multi_frame_images": self.multi_frame, "frames": FRAME_RULES[self.frames],
                **({"frame_images": sum(self.frame_counts.values())} if self.frames == "all" else {}),
                **({"dicom": dicom_files} if self.dicom_display else {})}


def ingest_notes(card: dict) -> list[str]:
    """What a user should hear about how the pixels were read: transparency dropped, pages left out, EXIF
    turns, colour-encoded files read as grey, DICOM display rules, and an option that had nothing to act on."""
    notes = []
    pixels = card.get("pixels", {})  # versions before 2026-12-07 have none
    if n := pixels.get("transparent_images"):
        notes.append(f"{n} images have transparent pixels: alpha is dropped, so those pixels keep their stored colour "
                     "(often black); flatten the files onto the background you want and ingest again to change it")
    if (n := pixels.get("multi_frame_images")) and "frame_images" in pixels:
        notes.append(f"{n} files hold several pages or frames (TIFF stacks, GIFs, DICOM volumes or clips): each of "
                     f"their {pixels['frame_images']} frames is an image, a file's frames in one split")
    elif n:
        notes.append(f"{n} files hold several pages or frames (a TIFF stack, an animated GIF): only the first of each "
                     "is read; --frames all reads every frame as an image")
    if n := pixels.get("exif_rotated_images"):
        notes.append(f"{n} images turned upright by their EXIF orientation (stored as image viewers show them)")
    if n := pixels.get("grey_stored_as_colour"):
        notes.append(f"{n} colour-encoded images hold grey pixels: read as grey (1 channel; --colour rgb keeps 3)")
    if d := pixels.get("dicom"):
        notes.append(f"{d['files']} DICOM files (by their headers; any that failed to decode are skipped): "
                     + _by_display(d)
                     + (f"; {d['monochrome1_inverted']} MONOCHROME1 inverted" if d["monochrome1_inverted"] else ""))
    options = ("bit_depth",) if pixels.get("dicom") else ("bit_depth", "window")  # --window acts on DICOM too
    given = [f"--{k.replace('_', '-')} {v}" for k, v in card.get("config", {}).items()
             if k in options and v is not None]
    if given and card.get("intensity", {}).get("rule", "").startswith("none"):
        notes.append(f"{' and '.join(given)} not applied (" + ("DICOM is displayed by its own header; every other "
                     "input is 8-bit)" if pixels.get("dicom") else "only inputs deeper than 8 bits are rescaled; every "
                     "input is 8-bit)"))
    return notes


def pixel_summary(card: dict) -> str:
    """How the inputs' pixels became the stored 8-bit images: the card's intensity and pixels records in words."""
    i, p = card.get("intensity") or {}, card.get("pixels") or {}  # versions before 2026-12-07 have no pixels
    depth = {"bit-depth": f"deeper than 8 bits rescaled by bit depth ({i.get('bits') or 'per image'} bits)",
             "percentile-window": f"deeper than 8 bits windowed per image to percentiles {i.get('percentiles')}"
             }.get(i.get("rule"), i.get("rule", "unrecorded"))
    if p.get("colour") == "auto":
        n = p.get("grey_stored_as_colour")
        colour = (f"3 channels (first image in colour: {p['first_colour_image']})" if p["channels"] == 3 else
                  f"1 channel ({n} colour-encoded files hold grey pixels)" if n else "1 channel (every file grey)")
    else:
        colour = {"grey": "1 channel (--colour grey)", "rgb": "3 channels (--colour rgb)"}.get(p.get("colour"),
                                                                                            "channels as published")
    more = [f"{p[k]} {what}" for k, what in (("transparent_images", "images with transparent pixels (alpha dropped)"),
                                            ("exif_rotated_images", "images turned upright by their EXIF orientation"),
                                            ("multi_frame_images", "multi-page files (every frame an image)"
                                             if "frame_images" in p else "multi-page files (first page read)"))
            if p.get(k)]
    if d := p.get("dicom"):
        more.append(f"{d['files']} DICOM files ({_by_display(d)})")
    return "; ".join([depth, colour, *more])


def _by_display(d: dict) -> str:
    """A card's DICOM counts: "2 by min..max, 5 by own window"."""
    return ", ".join(f"{n} by {how}" for how, n in d["display"].items())
