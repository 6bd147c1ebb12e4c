"""Finding burned-in text precisely: the fast line search proposes, the learned detector decides.

The line search (service.imaging.text) costs a few milliseconds and finds every burned-in line, but on bright
textured anatomy (a CT body, a PET heart, ribs) it also proposes regions that are not text. PP-OCR's DB detector
(service.imaging.ocr_models) tells text from anatomy with tight boxes, but costs about 1.4 ms per 10,000 pixels
(folded, see service.models.onnx_folding): a chest X-ray at full resolution would take a third of a second. So
the detector sees only the proposals: each one is cropped with a margin, turned upright if it runs vertically,
scaled so its text is about as tall as the detector reads best, contrast-stretched (faint text becomes plain
text), and packed with the others into one mosaic that the detector reads in a single run. What it finds there
is redacted; a proposal it finds no text in is anatomy and stays untouched. A line of the line search that runs
on beyond the text found there is looked at again in a crop of its own (one crop's contrast stretch serves one
kind of text). Proposals too small to verify usefully are redacted as they are: they cost no anatomy. A line of the
line search the detector saw nothing in (thin, faint or light text can get nothing from it) that looks like a row of
letters is read by the recognizer, and redacted where it reads as text.

Orientation markers (an isolated `R` or `L`, `AP`, `PA`, `PORTABLE`, `SUPINE`, `ERECT`) say how the patient lay,
not who they are: the recognizer reads each isolated short line, and the markers are kept unless
`keep_markers` is off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from service.imaging.codec import to_8bit
from service.imaging.ocr_models import CtcTextRecognizer, DbTextDetector, Reading, TextRegion
from service.imaging.text import Box, propose_text
from service.models.fetch import FOLDED_TEXT_MODELS, TEXT_DETECTOR_FILE, TEXT_RECOGNIZER_FILE
from service.settings import TEXT_MODELS_FOLDER

#: Proposals of at most this many pixels are redacted without asking the detector: too small to hold more than
#: a few small characters, so verifying them would cost more (about 1 ms each) than the anatomy they hide.
_UNVERIFIED_MAX_PIXELS = 32 * 32
#: Context around each proposal in its crop: this many of its text lines (at least, at most this many pixels).
#: The detector sees the line's surroundings, and a line of the same block the line search missed (a faint
#: name over grain, above the ID it found) is read with it.
_CROP_MARGIN_LINES = 1.5
_CROP_MARGIN_PX = 8
_MAX_CROP_MARGIN_PX = 64
#: At most this much plain background is added where the image's edge cuts a crop's margin off; its level is the
#: median of at most about this many of the crop's pixels.
_EDGE_PAD_PX = 16
_MEDIAN_SAMPLE_PIXELS = 1_000_000
#: Text is scaled down to about this height: the detector finds lines from ~8 px up, and fewer pixels cost less.
_TEXT_HEIGHT_PX = 20
#: Lines thinner than this (specks of noise or texture) do not set a crop's scale when thicker lines are there.
_MIN_SCALING_LINE_PX = 10
#: A proposal more than this many of its lines' median thickness across is a block where text touches anatomy;
#: its lines at most _BLOCK_LINE_THICKNESS times the _BLOCK_THIN_PERCENTILE of their thickness are read again in
#: crops of their own (see _block_lines), unless the block's crop holds this share of one's crop and shows its
#: text large enough.
_BLOCK_LINES = 6
_BLOCK_THIN_PERCENTILE = 25
_BLOCK_LINE_THICKNESS = 3
_HELD_SHARE = 0.9
#: No crop goes to the detector larger than this (a proposal spanning a whole CT body is scaled down to it).
_MAX_CROP_PIXELS = 640 * 640
#: A crop larger than this at _TEXT_HEIGHT_PX (a photo or a PET whose texture the line search proposes everywhere)
#: is scaled further, until its text is this tall or the crop is this large: the detector's cost follows the
#: pixels, and it still reads text of this height.
_LARGE_CROP_PIXELS = 100_000
_LARGE_CROP_TEXT_HEIGHT_PX = 14
#: At most this many proposal pixels, and this many pixels of crops, are verified in one image (about half a second
#: of the detector's CPU).
_MAX_VERIFIED_PIXELS = 2_500_000
#: Crops go to the detector in mosaics of at most this many pixels (plus packing): ONNX Runtime keeps the memory of
#: its largest run for the worker's lifetime, about 140 MB per megapixel of mosaic.
_MAX_MOSAIC_PIXELS = 1_000_000
#: A proposal this much taller than wide runs vertically: its crop is turned to horizontal.
_VERTICAL_ASPECT = 1.5
#: The mosaic: crops on shelves this far apart (the detector's input is a multiple of 32).
_MOSAIC_GAP_PX = 16
_DETECTOR_STRIDE = 32
#: A crop whose contrast spans fewer grey levels than this holds no readable text; stretching it would only
#: magnify its noise.
_MIN_CROP_RANGE = 8
#: Redaction padding around each detected line, as a fraction of its height, and at least this many pixels: the
#: detector's box fits the glyphs; the padding takes their antialiased edges and what JPEG rang around them.
_PAD_FRACTION = 0.3
_MIN_PAD_PX = 3
#: At each end of a line (one at least this many times longer than thick), the padding reaches on to where a line
#: of the line search that runs on beyond that end stops, up to this fraction of the line's thickness: the
#: detector's region often stops short of a first or last character it saw faintly (a third of the ink the partly
#: redacted lines of the ten unseen sets kept lay just beyond a box's end), and the line search saw it there.
_MAX_END_PAD_FRACTION = 0.8
_MIN_END_PADDED_ASPECT = 2
#: Orientation markers (normalised: capitals and digits only).
MARKERS = frozenset({"R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT"})
#: A region the detector finds that is less than this many times wider than tall is text only if the recognizer
#: reads at least two characters in it with this confidence: a block of rib stripes reads as nothing or one
#: character at 0.3, but a round PET heart reads as "0" at 0.9; a lone character identifies nobody.
_MIN_LINE_ASPECT = 2.5
_MIN_READ_CONFIDENCE = 0.5
#: A region at least this many times thicker than the text its crop was scaled for (the typical thickness of the
#: line search's lines there) is judged as a squat one is, whatever its shape: the detector took an MR's contour-like
#: gyri for a line 88 px thick in a crop of 9.5 px text (12014 of bench/privacy.py's sets: 9.3 times), while no
#: line-shaped region on text in 576 unseen images was more than 5.7 times thicker than its crop's text.
_MAX_TEXT_HEIGHTS_THICK = 6
#: A blob of the line search this letter-like (at least this tall and wide, at most this elongated) is read by
#: the recognizer when the detector finds nothing there, and is a line if it reads with this confidence: the
#: recognizer overrules the detector only when sure (a PET hot spot read as "01" at 0.53 was redacted, a tenth
#: of the image; a marker letter counts only from _MARKER_MIN_CONFIDENCE, which is as high).
_MIN_GLYPH_PX = 12
_MAX_GLYPH_ASPECT = 2.0
_MIN_GLYPH_CONFIDENCE = 0.6
#: At most this many per image: letters alone in their proposal first, then the largest (markers are large;
#: anatomy offers many small ones).
_MAX_GLYPH_READS = 4
#: The lines of one proposal are one letter if their union is letter-shaped and at most this much larger than the
#: largest of them.
_LONE_LETTER_SPREAD = 1.5
#: At most this many more lines are read to tell markers and squat regions apart (a photo's texture makes dozens
#: of squat regions, each reading costs 2-4 ms): possible markers first, then squat regions, largest first. A
#: squat region left unread is redacted, and a possible marker left unread is not kept (privacy first).
_MAX_LINE_READS = 6
#: Squat regions side by side read as one word (a letter each) when at most this many of their heights apart: the
#: detector finds a word's letters apart a fraction of their height from each other, not two ventricles of a brain
#: a height apart (read as `X` and `2`).
_LETTER_GAP = 0.5
#: A squat region that reads as text only with its word, all of whose other lines it is more than this many times
#: as tall as, is not one of the word's letters (a word's letters are of one size: a capital beside small ones, an
#: `l` beside an `a`) but anatomy the text runs up to: a brain's ventricles, 2.6 times as tall as the name burned in
#: next to them, read as `X`. Only the rows of that text are redacted through it (see _bands_through).
_MAX_LETTER_HEIGHTS = 2.0
#: Lines are orientation markers if they stand apart from other text (nothing within this many of their heights),
#: are short, are at most this many together, and each reads as a marker.
_MARKER_ISOLATION = 1.5
_MAX_MARKER_GROUP = 3
_MARKER_MAX_ASPECT = 7.0
#: A lone letter's confidence swings with a pixel or two of its box (an `R` read at 0.71 in one box and 0.9 in the
#: next), so the bar is low: what passes is kept as it is, which is also what happens to anatomy, and a single
#: letter or a marker word identifies nobody. A reading below it but above the retry level is read once more.
_MARKER_MIN_CONFIDENCE = 0.6
_MARKER_RETRY_CONFIDENCE = 0.3
#: A squat region is cut in two rows at its quietest row within this band of its height, if it is at least this
#: much longer than thick (two lines of a name or an ID are; a round organ is not).
_MIN_ROWS_ASPECT = 1.4
_ROW_CUT_BAND = (0.3, 0.7)
#: Burned-in ink steps through its contrast within a pixel or two; a PET's hot spots and a round head rise over many.
#: A squat region none of whose edges is steeper than about an even ramp across _EDGE_WINDOW_PX pixels (which climbs
#: a quarter of the window's range per pixel) is anatomy, and is not read: in every channel, the steepest steps
#: between neighbouring pixels (the 99.9th percentile: a short word in a large region is enough) are less than
#: _MIN_EDGE_STEEPNESS of the widest ranges of levels in the windows around them (the same percentile, at least
#: _MIN_RANGE_LEVELS). Ranges in windows, not the region's spread: faint text over a bright organ's edge is steep for
#: its own contrast. Over the eight unseen sets of bench/privacy.py, squat regions of text measure 0.40 or more, the
#: PET heads, kidneys and hot spots that the recognizer read as text 0.21-0.26.
_EDGE_WINDOW_PX = 5
_EDGE_PERCENTILE = 99.9
_MIN_EDGE_STEEPNESS = 0.3
_MIN_RANGE_LEVELS = 8
#: The ways a vertical squat region's rows are turned upright, in the order tried: text burned along a side edge
#: reads top to bottom or bottom to top, and the recognizer reads nothing upside down.
_READING_TURNS = (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_90_COUNTERCLOCKWISE)
#: A line of the line search (line-shaped: at least _MIN_SCALING_LINE_PX thick and _MIN_LINE_ASPECT times longer)
#: that runs on beyond the text the detector found in its row (or column), the same way, for at least this many of
#: that text's heights, is looked at again there in a crop of its own, scaled for that text: the detector finds
#: text where its crop shows it plainly, and one crop's contrast stretch serves one kind of text (a faint name
#: crossing from a PET's dark floor onto its bright body was found on the floor only). At most this many per image,
#: the largest first.
_RUN_ON_HEIGHTS = 4
_MAX_SECOND_LOOKS = 4
#: A line-shaped line of the line search that lies mostly outside what is redacted or kept (less than _MAX_SEEN_SHARE of
#: it in those boxes) is one in which the detector saw nothing. Thin, faint or light text (an extra-light or serif
#: italic name under ~30 px, faint over an MR's floor) makes such lines, as the edges of ribs and organs do: the
#: detector's text probability on it is nil, but the recognizer, reading the line's piece stretched on its own, reads
#: it. In bench/privacy.py's eighteen sets (5004 such lines), 141 of the 376 on text read as text
#: (_reads_as_unseen_text), 2 of the 4515 on anatomy. A reading costs about 5 ms (a line is 100-300 columns at 32 px),
#: so only a line whose piece looks like a row of letters is read. Scaled to _STROKE_TEST_HEIGHT_PX tall and split into
#: ink and background: its middle rows change from one to the other at least _MIN_STROKE_CHANGES times per height of
#: length (text 4.3 at the median, anatomy 1.1); its columns, at least _MIN_COLUMN_CHANGES times on average (letters'
#: bowls, bars and serifs: text 3.1, anatomy 1.6, a spine's vertebrae, bars across the line, 1.8; a CT scout's spine
#: with its pedicles, 2.0-2.05, passes and is read, but 2.2 turned away text whose line runs on a quarter of its length
#: over plain background); and its edges run every way, as letters' do: those across the line _MIN_ACROSS_EDGES to
#: _MAX_ACROSS_EDGES times those along it (text 1.1; a rib's or an organ's edge runs along the line, anatomy 0.76, a
#: chest film 0.6; digits and capitals' upright strokes reach 1.7: `ID16714` over a CT scout's edge, read at 0.99, was
#: not read with the bound at 1.5, and no line on anatomy reads as text up to 1.8; a lower bound of 0.6 read a date's
#: line running on over a CT body as `O0DOB1971009` and redacted 7 % of the image). The split is one threshold for the
#: whole piece (Otsu), in grey and, in colour, in each channel (grey text over a PET's black strip and red floor is
#: plain in blue); failing that, on a line at least _MIN_LOCAL_SPLIT_THICKNESSES of its thicknesses long, each pixel
#: against the mean of the _LOCAL_SPLIT_PX square around it (about a text height): text crossing from one background
#: onto another, or over brighter anatomy, is split by one threshold into its backgrounds, not into letters. Otsu in
#: grey alone, with the bound across at 1.5, passed 88 of the 141 lines that read as text and 7.2 % of the lines on
#: anatomy; with the channels, the local split and the bound at 1.8, 116 and 8.7 % (shorter lines split locally are
#: mostly anatomy: 0.36 -> 0.74 readings per CT scout without the length limit, 0.52 with it, for two lines of text
#: more), none of the 2 on anatomy that read as text. At most _MAX_UNSEEN_READS readings per image (a line down an edge
#: takes two): lines split by one threshold first (see _reading_order), those with the most changes along them first, of
#: the _MAX_STROKE_TESTS most elongated lines. Where one reads as text (and not as a marker kept) is redacted: the part
#: of the line its characters were read in, not all of it (the line search's line may run on over anatomy).
_MAX_SEEN_SHARE = 0.5
_STROKE_TEST_HEIGHT_PX = 32
_MIN_STROKE_CHANGES = 2.5
_MIN_ACROSS_EDGES = 0.8
_MAX_ACROSS_EDGES = 1.8
_MIN_COLUMN_CHANGES = 2.0
_LOCAL_SPLIT_PX = 31
_MIN_LOCAL_SPLIT_THICKNESSES = 5
_MIN_UNSEEN_CHARACTERS = 4
_MIN_UNSEEN_CONFIDENCE = 0.7
#: A reading of at least this many different characters counts with less confidence: names, IDs and dates are made of
#: many, while anatomy read as characters is a few round or straight ones again and again (`OLOLALALO`, `222222222`,
#: `AABABAO`). Over eighteen sets of bench/privacy.py, no line on anatomy read as 6 different characters with
#: confidence 0.55 or more (the most sure, `ALAVYUO` at 0.54), and 15 of the 36 lines on text that read at 0.55-0.7
#: did, 13 at 0.6 or more (`EAC96242` at 0.68 down a PET's edge, `103797881042` at 0.69).
_MIN_DISTINCT_CHARACTERS = 6
_MIN_DISTINCT_CONFIDENCE = 0.6
_MAX_UNSEEN_READS = 4
#: Once a line reads as text, an image gets this many readings more (once): the text the detector did not see comes
#: in blocks (a name above its ID, both running down an edge: two readings each), and an image with one such line
#: likely has more. Over eighteen sets of bench/privacy.py, 4 lines of text more read (one of them the name of a
#: leaking block), for 0.04-0.12 readings more an image (none more on images without such text).
_MORE_UNSEEN_READS = 2
#: Where a line reads as text, its row (column) is read on beyond the part read, up to this many of its thicknesses
#: each way, at most _MAX_ONWARD_READS readings per image: the line search's line can stop short of its text (a faint
#: rectangle across 21011's name and ID stopped their lines after `ANNA` and `ID23`, and the rest leaked). Beside text
#: read, _MIN_ONWARD_CHARACTERS with confidence _MIN_UNSEEN_CONFIDENCE are text too (the end of an ID, `386`). Over
#: eighteen sets of bench/privacy.py, 14 blocks more redacted (21011's name, leaking, 0.40 -> 0.99 of its ink), none
#: less, no image more than 0.003 less kept.
_ONWARD_THICKNESSES = 8
_MAX_ONWARD_READS = 4
_MIN_ONWARD_CHARACTERS = 3
#: Only lines at most this thick are looked at: the detector misses thin, faint and small text, not large, and the
#: lines of text it did not see that the recognizer read were 10-40 px thick over sixteen sets of bench/privacy.py;
#: half a CT scout's rib cage, a line 109 px thick, read as `LCCC` at 0.74 and took 22 % of the image (seed 21028).
_MAX_UNSEEN_THICKNESS_PX = 64
#: Two lines of text set close together are one line to the line search (a name above its ID), and the recognizer,
#: reading one line at a time, reads too little of either. A line at least _MIN_ROWS_PX thick whose reading fails
#: but reads something with at least _MIN_ROWS_HINT_CONFIDENCE (two rows read as one give a few characters at
#: 0.53-0.77; grain along a film's edge a digit or five at 0.26-0.58) is read again as two rows (_row_parts), cut at its
#: quietest row: at most _MAX_UNSEEN_ROW_READS readings more an image. Over eighteen sets of bench/privacy.py (864
#: images): 12 blocks of 11 images more redacted (0.21-1.0 of their ink; 19005's leaking name and ID now whole), none
#: less, no anatomy lost; about 0.45 readings an image more.
_MAX_UNSEEN_ROW_READS = 4
_MIN_ROWS_PX = 16
_MIN_ROWS_HINT_CONFIDENCE = 0.5
_MAX_STROKE_TESTS = 64
#: Lines whose windows overlap by more than this share of the smaller are one place: each place is read (its most
#: stroke-like line) before any is read again, or a vertical name's two lines take all four readings and a date
#: beside them goes unread (seed 17005).
_SAME_PLACE_SHARE = 0.5
#: Of a line longer than this many of its thicknesses, only its first part so long is tested and read: a reading
#: costs about 40 us per column, and a line can run across a whole image. The unseen lines on text of
#: bench/privacy.py's sets are at most 16 times longer than thick.
_MAX_READ_THICKNESSES = 16
#: The recognizer reads a line with this fraction of its height around it.
_READ_MARGIN = 0.25
#: A piece whose channels differ from its grey by more than this many levels is in colour.
_COLOUR_LEVELS = 16


@dataclass(frozen=True)
class TextFindings:
    """Where an image's burned-in text is: the boxes to redact, and the orientation markers kept as they are."""

    redact: list[Box]
    markers: list[Box]

    @property
    def all_text(self) -> list[Box]:
        """Every box holding text (what the stamp must not cover)."""
        return [*self.redact, *self.markers]


@dataclass(frozen=True)
class ProposedText:
    """What the line search proposes in one image: where text may be, anatomy included. Enough to keep a stamp off
    any text (an image that gets no anonymized copy needs no more); `TextDetector.verify` tells text from anatomy.
    It holds no pixels: it may wait for the model, and a 16-bit image's 8-bit copy would wait with it."""

    #: The lines found, as (x, y, w, h) rows.
    lines: np.ndarray
    #: The boxes around them, padded for blurring and merged where they overlap.
    boxes: list[Box]

    @property
    def all_text(self) -> list[Box]:
        """Every box that may hold text (what a stamp must not cover)."""
        return self.boxes


@dataclass(frozen=True)
class _Crop:
    """One proposal's crop: where it came from and where it sits in the mosaic."""

    left: int
    top: int
    #: The crop's size in the image (before turning and scaling).
    width: int
    height: int
    scale: float
    #: Turned 90 degrees clockwise before scaling.
    turned: bool
    #: The height of text the scale was set for (a proposal's lines' median thickness; see _block_lines).
    text_height: float
    #: Its place and size in the mosaic (turned and scaled).
    x: int
    y: int
    mosaic_width: int
    mosaic_height: int

    @property
    def mosaic_pixels(self) -> int:
        """What the crop costs the detector: its pixels in the mosaic."""
        return self.mosaic_width * self.mosaic_height


@dataclass(frozen=True)
class _Found:
    """A text line the detector found: the pieces of it to redact (its box alone, unless the detector's region is no
    straight band: see service.imaging.ocr_models._BAND_RATIO), and whether it is far thicker than the text its crop
    was scaled for (see _MAX_TEXT_HEIGHTS_THICK)."""

    pieces: tuple[Box, ...]
    too_thick: bool


@dataclass(frozen=True)
class TextDetector:
    """The cascade, with its two models loaded once (in a worker, at start)."""

    model_dir: Path
    keep_markers: bool = True
    _detector: DbTextDetector = field(init=False, repr=False, compare=False)
    _recognizer: CtcTextRecognizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for pinned, name in FOLDED_TEXT_MODELS.items():
            if not (self.model_dir / name).is_file():
                # A folder filled by an older version (a mounted TEXT_MODELS_DIR) has the pinned file only.
                older = (f"; it holds {pinned} only: the fetch writes the folded copy beside it, in "
                         f"$MODEL_CACHE_DIR/{TEXT_MODELS_FOLDER}, from where it can be copied here"
                         if (self.model_dir / pinned).is_file() else "")
                raise FileNotFoundError(f"text model {name} is not in {self.model_dir}: run `xray-pipeline model "
                                        f"fetch` (`make model`){older}")
        object.__setattr__(self, "_detector", DbTextDetector(self.model_dir / TEXT_DETECTOR_FILE))
        object.__setattr__(self, "_recognizer", CtcTextRecognizer(self.model_dir / TEXT_RECOGNIZER_FILE))

    @classmethod
    def load(cls, model_dir: Path, *, keep_markers: bool = True) -> TextDetector:
        return cls(model_dir, keep_markers)

    def find(self, pixels: np.ndarray) -> TextFindings:
        """The burned-in text of `pixels` (HxW or HxWxC, 8 or 16 bits; what a viewer shows)."""
        image = to_8bit(pixels)  # once for both halves
        return self.verify(image, self.propose(image))

    @staticmethod
    def propose(pixels: np.ndarray) -> ProposedText:
        """The cascade's first, cheap half: the line search's proposals (see `find`)."""
        return ProposedText(*propose_text(pixels))

    def verify(self, pixels: np.ndarray, proposed: ProposedText) -> TextFindings:
        """The cascade's second half: which of the proposals of `pixels` is text, and which of that is an orientation
        marker."""
        # 8 bits as stored (grey stays one channel): only the pieces read by the models are made BGR.
        image = to_8bit(pixels)
        proposed_lines, proposals = proposed.lines, proposed.boxes
        redact: list[Box] = []
        to_verify: list[tuple[Box, float]] = []
        # Lines of text size inside proposals where text touches anatomy (see _block_lines).
        within_blocks: list[tuple[Box, float]] = []
        down_blocks: list[tuple[Box, float]] = []
        glyphs: list[tuple[bool, int, Box]] = []
        second_looks: list[Box] = []
        # Readings of letter-shaped blobs (at most _MAX_GLYPH_READS), and the lone letters that read as markers.
        readings: dict[Box, tuple[str, float]] = {}
        lone_markers: list[Box] = []
        centre_x = proposed_lines[:, 0] + proposed_lines[:, 2] / 2
        centre_y = proposed_lines[:, 1] + proposed_lines[:, 3] / 2
        for box in proposals:
            if box[2] * box[3] <= _UNVERIFIED_MAX_PIXELS:
                redact.append(box)
                continue
            x, y, width, height = box
            within = (centre_x >= x) & (centre_x < x + width) & (centre_y >= y) & (centre_y < y + height)
            inside = proposed_lines[within]
            lines_of_text = np.minimum(inside[:, 2], inside[:, 3]) >= _MIN_SCALING_LINE_PX
            letter = _lone_letter(inside[lines_of_text])
            if letter is not None and len(readings) < _MAX_GLYPH_READS:
                # A letter alone in its proposal (specks aside), as a film's `R` is: if it reads as an orientation
                # marker, it is one, and the detector need not see it.
                readings[letter] = self._marker_reading(image, letter)
                if _is_marker(*readings[letter]):
                    lone_markers.append(letter)
                    continue
            text_height = _text_height(inside, box)
            to_verify.append((box, text_height))
            # Its lines that may run on beyond the text the detector will find (see _RUN_ON_HEIGHTS).
            second_looks += [tuple(int(value) for value in line) for line in inside[_line_shaped(inside)]]
            if min(width, height) > _BLOCK_LINES * text_height:
                across_block, down_block = _block_lines(inside)
                within_blocks += across_block
                down_blocks += down_block
            # A letter alone in its proposal first (a film's marker), then the largest.
            glyphs += [(len(inside) > 1, -int(line[2] * line[3]), tuple(int(value) for value in line))
                       for line in inside if _glyph_shaped(line)]
        # More to verify than a worker should spend on one image (text or texture everywhere: the proposals, or the
        # crops made of them and of the lines in blocks): what the line search found is redacted as it stands.
        # Privacy first; the anatomy under the proposals is lost.
        affordable = sum(min(box[2] * box[3], _MAX_CROP_PIXELS) for box, _ in to_verify) <= _MAX_VERIFIED_PIXELS
        crops = _verification_crops(image, to_verify, within_blocks) if affordable else []
        spent = sum(crop.mosaic_pixels for crop, _ in crops)
        if not affordable or spent > _MAX_VERIFIED_PIXELS:
            return TextFindings(redact=sorted(proposals, key=lambda box: (box[1], box[0])), markers=[])
        crops += _down_crops(image, down_blocks, crops, _MAX_VERIFIED_PIXELS - spent)
        found = self._verified(image, crops)
        lines = [*found, *lone_markers]
        spent = sum(crop.mosaic_pixels for crop, _ in crops)
        looked_again = self._second_look(image, second_looks, lines, _MAX_VERIFIED_PIXELS - spent)
        lines += looked_again
        found |= {line: seen for line, seen in looked_again.items() if line not in found}
        # The detector does not see every lone letter as text (an `L` is two strokes; a large serif `R`): a
        # letter-shaped blob of the line search, where the detector found nothing, is read by the recognizer, and
        # is a line if it reads as a character (the largest few: each reading costs about 1.5 ms).
        for _, _, glyph in sorted(glyphs):
            if any(_overlap(glyph, line) for line in lines):
                continue
            if glyph not in readings:
                if len(readings) == _MAX_GLYPH_READS or any(_overlap(glyph, read) for read in readings):
                    continue
                readings[glyph] = self._marker_reading(image, glyph)
            if readings[glyph][0] and readings[glyph][1] >= _MIN_GLYPH_CONFIDENCE:
                lines.append(glyph)
        markers: list[Box] = []
        too_thick = {line for line, seen in found.items() if seen.too_thick}
        kinds, word_mates = self._kinds(image, lines, readings, too_thick)
        for index, (line, kind) in enumerate(zip(lines, kinds, strict=True)):
            if kind == "marker":
                markers.append(line)
            elif kind == "text":
                pieces = found[line].pieces if line in found else (line,)
                redact += _padded_pieces(line, pieces, proposed_lines, image.shape)
            elif kind == "beside":
                text_beside = [lines[mate] for mate in word_mates[index] if kinds[mate] == "text"]
                for band in _bands_through(line, text_beside):
                    redact += _padded_pieces(band, (band,), proposed_lines, image.shape)
        for line in self._unseen_text(image, proposed_lines, [*redact, *markers]):
            redact += _padded_pieces(line, (line,), proposed_lines, image.shape)
        return TextFindings(redact=sorted(redact, key=lambda box: (box[1], box[0])),
                            markers=sorted(markers, key=lambda box: (box[1], box[0])))

    def finds_text(self, pixels: np.ndarray, proposed: ProposedText, box: Box) -> bool:
        """Whether the detector finds text in `box` of `pixels` (or reaching into it), given their proposals: one run
        on a crop of the box with a margin, scaled for the lines the line search found there. Where the proposals
        cover every place a stamp can go (a photo's texture), this looks at a few places instead of verifying
        everything. It asks no recognizer, so anatomy the detector takes for text counts as text (the stamp goes
        elsewhere)."""
        x, y, width, height = box
        lines = proposed.lines
        reaching = ((lines[:, 0] < x + width) & (x < lines[:, 0] + lines[:, 2]) & (lines[:, 1] < y + height)
                    & (y < lines[:, 1] + lines[:, 3]))
        image = to_8bit(pixels)
        crops = _crops(image, [(box, _text_height(lines[reaching], box))])
        return any(_overlap(line, box) for line in self._verified_lines(image, crops))

    # --- verification --------------------------------------------------------------------------------------

    def _verified_lines(self, image: np.ndarray, crops: list[tuple[_Crop, np.ndarray]]) -> list[Box]:
        """The text lines the detector finds in `crops` (image coordinates, unpadded)."""
        return list(self._verified(image, crops))

    def _verified(self, image: np.ndarray, crops: list[tuple[_Crop, np.ndarray]]) -> dict[Box, _Found]:
        """The text lines the detector finds in `crops` (image coordinates, unpadded), each with what else is known
        of it (_Found)."""
        found: dict[Box, _Found] = {}
        for group in _mosaic_groups(crops):
            mosaic, placed = _mosaic(group)
            for region in DbTextDetector.regions(self._detector.probability(mosaic)):
                crop = _crop_holding(placed, region)
                if crop is not None:
                    line = _within(_to_image(region.box, crop), image.shape)
                    pieces = [_within(_to_image(piece, crop), image.shape) for piece in region.pieces]
                    pieces = [piece for piece in pieces if piece[2] and piece[3]] or [line]
                    too_thick = min(line[2], line[3]) >= _MAX_TEXT_HEIGHTS_THICK * crop.text_height
                    found[line] = _Found(tuple(pieces), too_thick)
        return {line: found[line] for line in _deduplicated(list(found))}

    def _second_look(
        self, image: np.ndarray, candidates: list[Box], found: list[Box], budget: int
    ) -> dict[Box, _Found]:
        """The text lines the detector finds in the parts of the line search's line-shaped `candidates` that run on
        beyond the text found (`found`; see _RUN_ON_HEIGHTS), in crops of their own of at most `budget` pixels (see
        `_verified`)."""
        parts = [part for part in (_run_on(line, found) for line in candidates) if part is not None]
        parts = sorted(parts, key=lambda part: -part[0][2] * part[0][3])[:_MAX_SECOND_LOOKS]
        crops = _affordable(_crops(image, parts), budget) if parts else []
        return self._verified(image, crops) if crops else {}

    # --- reading --------------------------------------------------------------------------------------------

    def _unseen_text(self, image: np.ndarray, proposed_lines: np.ndarray, seen: list[Box]) -> list[Box]:
        """Where the line-shaped lines of the line search (`proposed_lines`) mostly outside the boxes `seen` (redacted
        or kept) read as text: see _MAX_UNSEEN_READS."""
        thin = np.minimum(proposed_lines[:, 2], proposed_lines[:, 3]) <= _MAX_UNSEEN_THICKNESS_PX
        shaped = _line_shaped(proposed_lines) & thin
        lines = np.unique(proposed_lines[shaped], axis=0) if shaped.any() else proposed_lines[:0]
        lines = lines[_covered_shares(lines, seen) < _MAX_SEEN_SHARE]
        # The most elongated first: a texture's lines can be many, and each test costs about 0.1 ms.
        lines = lines[np.argsort(-lines[:, 2:4].max(axis=1) / lines[:, 2:4].min(axis=1), kind="stable")]
        boxes = [tuple(int(value) for value in line) for line in lines[:_MAX_STROKE_TESTS]]
        windows = [_first_part(box, _MAX_READ_THICKNESSES) for box in boxes]
        tests = [_stroke_test(_reading_piece(image, window, _READ_MARGIN),
                              locally=max(window[2:]) >= _MIN_LOCAL_SPLIT_THICKNESSES * min(window[2:]))
                 for window in windows]
        # Each line that reads as text, with its turn and its reading.
        read: list[tuple[Box, int, Reading]] = []
        readings_left, row_readings_left, more_reads = _MAX_UNSEEN_READS, _MAX_UNSEEN_ROW_READS, _MORE_UNSEEN_READS
        for index in _reading_order(windows, tests):
            window = windows[index]
            # Text running down an edge reads either way up (two readings); upside down it reads as nothing.
            turns = _READING_TURNS if _runs_vertically(window) else _READING_TURNS[:1]
            if len(turns) > readings_left:
                continue
            readings_left -= len(turns)
            reading, turn = self._best_reading(image, window, turns)
            if _reads_as_unseen_text(reading):
                read.append((window, turn, reading))
                # Burned-in text the detector missed comes in blocks: more of it is likely (see _MORE_UNSEEN_READS).
                readings_left += more_reads
                more_reads = 0
            elif (reading.text and reading.confidence >= _MIN_ROWS_HINT_CONFIDENCE and min(window[2:]) >= _MIN_ROWS_PX
                  and 2 * len(turns) <= row_readings_left):
                # Two lines of text set close together are one line to the line search, and the recognizer reads one
                # at a time: see _MAX_UNSEEN_ROW_READS.
                row_readings_left -= 2 * len(turns)
                for row in _row_parts(image, window):
                    reading, turn = self._best_reading(image, row, turns)
                    if _reads_as_unseen_text(reading):
                        read.append((row, turn, reading))
        text: list[Box] = []
        onward_readings_left = _MAX_ONWARD_READS
        for line, turn, reading in read:
            parts = self._unless_marker(image.shape, line, turn, reading)
            text += parts
            # The line search's line may stop short of its text's end (a faint rectangle across a name stopped 21011's
            # lines after `ANNA` and `ID23`): the row (column) is read on beyond each part (see _ONWARD_THICKNESSES).
            for part in parts:
                for onward in _onward(image.shape, part, _runs_vertically(line))[:onward_readings_left]:
                    onward_readings_left -= 1
                    reading = self._reading(image, onward, _READ_MARGIN, turn)
                    if _reads_on_as_text(reading):
                        text += self._unless_marker(image.shape, onward, turn, reading)
        return text

    def _best_reading(self, image: np.ndarray, line: Box, turns: tuple[int, ...]) -> tuple[Reading, int]:
        """The reading of `line` of most conviction, turned each of `turns` if it runs vertically, and its turn."""
        return max(((self._reading(image, line, _READ_MARGIN, turn), turn) for turn in turns),
                   key=lambda item: item[0].confidence)

    def _unless_marker(self, shape: tuple[int, ...], line: Box, turn: int, reading: Reading) -> list[Box]:
        """The part of `line` its characters were read in (the line search's line may run on over anatomy), unless
        the reading is a marker kept."""
        if self.keep_markers and _is_marker(reading.text, reading.confidence):
            return []
        return [_read_part(shape, line, turn, reading)]

    def _kinds(
        self, image: np.ndarray, lines: list[Box], known: dict[Box, tuple[str, float]], too_thick: set[Box]
    ) -> tuple[list[str], dict[int, list[int]]]:
        """"text", "marker" (an orientation marker, kept), "beside" (anatomy that text beside it runs up to: redacted
        in that text's rows, see _MAX_LETTER_HEIGHTS) or "anatomy" for each line found; and for each "beside" line,
        the other lines of its word.

        A line the detector finds is text, but for two kinds the recognizer decides: squat regions (a block of
        regular stripes such as ribs, or a round organ, can look like text to the detector; a real line is wide,
        a short word the recognizer reads, or one of the letters of a word; never a region with no edge as steep as
        ink's, see _soft; lines `too_thick` for the text around them are judged as squat ones), and small groups of
        short lines standing apart from any other text, which are orientation markers if each of their rows reads as
        one (`A-P` above an `R`, even when `A` and `P` were found apart)."""
        kinds = ["text"] * len(lines)
        word_mates: dict[int, list[int]] = {}
        shapes = [sorted(line[2:]) for line in lines]
        squat = [long < _MIN_LINE_ASPECT * short or line in too_thick
                 for (short, long), line in zip(shapes, lines, strict=True)]
        soft = [is_squat and _soft(image, line) for is_squat, line in zip(squat, lines, strict=True)]
        groups = [
            (group, len(group) <= _MAX_MARKER_GROUP and all(
                shapes[index][1] <= _MARKER_MAX_ASPECT * shapes[index][0] for index in group))
            for group in _groups(lines)
        ]
        # Possible markers are read first, then the largest groups.
        groups.sort(key=lambda item: (not item[1], -max(lines[index][2] * lines[index][3] for index in item[0])))
        reads_left = _MAX_LINE_READS
        for group, maybe_markers in groups:
            readings: dict[int, tuple[str, float]] = {}
            for index in group:
                if soft[index]:
                    continue
                # Without keeping markers, only a squat region needs reading (to tell a letter from anatomy).
                if lines[index] in known:
                    readings[index] = known[lines[index]]
                elif (squat[index] or (maybe_markers and self.keep_markers)) and reads_left:
                    reads_left -= 1
                    readings[index] = self._marker_reading(image, lines[index])
            rows = _rows(lines, group)
            # A squat region is a letter of a word only with the word's other letters next to it.
            words = {index: word for row in rows for word in _words(row, lines) for index in word}
            word_text = {index: _row_reading(word, lines, readings) for index, word in words.items()}
            markers = maybe_markers and all(
                all(index in readings for index in row) and _is_marker(*_row_reading(row, lines, readings))
                for row in rows
            )
            for index in group:
                joined, confidence = word_text[index]
                if soft[index]:
                    kinds[index] = "anatomy"
                elif markers:
                    kinds[index] = "marker" if self.keep_markers else "text"
                elif (
                    squat[index]
                    and index in readings
                    # A marker letter is kept like one, unless markers are redacted: then it is text.
                    and (self.keep_markers or not _is_marker(*readings[index]))
                    and (not _reads_as_text(joined, confidence)
                         or (not _reads_as_text(*readings[index]) and _towers_over(index, words[index], lines)))
                ):
                    # Two or three lines of text set close together are one squat region to the detector, and
                    # the recognizer reads one line at a time: a region tall enough is read again as two rows.
                    short, long = sorted(lines[index][2:])
                    if short >= 2 * _MIN_GLYPH_PX and long >= _MIN_ROWS_ASPECT * short and reads_left >= 2:
                        read_as_text, spent = self._rows_read_as_text(image, lines[index], reads_left)
                        reads_left -= spent
                        if read_as_text:
                            continue
                    kinds[index] = "beside" if _reads_as_text(joined, confidence) else "anatomy"
                    if kinds[index] == "beside":
                        word_mates[index] = [mate for mate in words[index] if mate != index]
        return kinds, word_mates

    def _rows_read_as_text(self, image: np.ndarray, line: Box, reads_left: int) -> tuple[bool, int]:
        """Whether `line`, cut in two rows (_row_parts), reads as text in either: at least two characters with
        conviction. Rows running vertically may read either way up, so they are read turned the other way too if
        the first reads nothing (two readings each way, while `reads_left` allows). Also the readings spent."""
        parts = _row_parts(image, line)
        turns = _READING_TURNS if any(map(_runs_vertically, parts)) else _READING_TURNS[:1]
        spent = 0
        for turn in turns:
            if reads_left - spent < len(parts):
                break
            spent += len(parts)
            if any(_reads_as_text(read, sure)
                   for read, sure in (self._read(image, part, _READ_MARGIN, turn) for part in parts)):
                return True, spent
        return False, spent

    def _marker_reading(self, image: np.ndarray, line: Box) -> tuple[str, float]:
        """What the recognizer reads in `line`; a marker read without conviction is read once more with more of its
        background around it (a dark letter on a bright, textured background reads better so)."""
        read, confidence = self._read(image, line, _READ_MARGIN)
        if read in MARKERS and _MARKER_RETRY_CONFIDENCE <= confidence < _MARKER_MIN_CONFIDENCE:
            read, confidence = max((read, confidence), self._read(image, line, 2 * _READ_MARGIN),
                                   key=lambda reading: reading[1])
        return read, confidence

    def _read(
        self, image: np.ndarray, line: Box, margin_fraction: float, upright: int = _READING_TURNS[0]
    ) -> tuple[str, float]:
        """What the recognizer reads in `line` (capitals and digits only), with a margin of this fraction of its
        height around it, turned by `upright` (a cv2.rotate code) if it runs vertically; and its confidence."""
        reading = self._reading(image, line, margin_fraction, upright)
        return reading.text, reading.confidence

    def _reading(
        self, image: np.ndarray, line: Box, margin_fraction: float, upright: int = _READING_TURNS[0]
    ) -> Reading:
        """`_read`'s reading, with where along the piece read (see _reading_piece) its characters lie."""
        piece = _reading_piece(image, line, margin_fraction, upright)
        grey = cv2.cvtColor(cv2.cvtColor(piece, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        readings = [self._recognizer.read(_stretched(grey))]
        if readings[0].confidence < _MARKER_MIN_CONFIDENCE and _in_colour(piece, grey):
            # In colour the recognizer is less sure of white text on a colour map (an `R` on a PET read at 0.55
            # in colour, 0.86 in grey), but only colour shows text as bright as its background: what grey does
            # not read with conviction is read in colour too.
            readings.append(self._recognizer.read(_stretched(piece)))
        best = max(readings, key=lambda reading: reading.confidence)
        return best._replace(text=re.sub(r"[^A-Z0-9]", "", best.text.upper()))


def _reading_piece(
    image: np.ndarray, line: Box, margin_fraction: float, upright: int = _READING_TURNS[0]
) -> np.ndarray:
    """The BGR piece of `image` the recognizer reads for `line`: with a margin of `margin_fraction` of its height,
    turned by `upright` (a cv2.rotate code) if it runs vertically."""
    left, top, right, bottom = _piece_bounds(image.shape, line, margin_fraction)
    piece = _bgr(image[top:bottom, left:right])
    return cv2.rotate(piece, upright) if _runs_vertically(line) else piece


def _piece_bounds(shape: tuple[int, ...], line: Box, margin_fraction: float) -> tuple[int, int, int, int]:
    """Left, top, right and bottom (exclusive) of the piece read for `line` in an image of `shape`."""
    x, y, width, height = line
    margin = max(2, round(margin_fraction * min(width, height)))
    return max(0, x - margin), max(0, y - margin), min(shape[1], x + width + margin), min(shape[0], y + height + margin)


def _read_part(shape: tuple[int, ...], line: Box, upright: int, reading: Reading) -> Box:
    """The part of `line` (in an image of `shape`) where `reading` of its piece (_READ_MARGIN, turned by `upright`
    if it runs vertically) read its characters, reaching half the line's thickness beyond the first and the last
    (a reading's steps mark the characters' middles more surely than their ends)."""
    x, y, width, height = line
    left, top, right, bottom = _piece_bounds(shape, line, _READ_MARGIN)
    vertical = _runs_vertically(line)
    # Along the line: where it starts and how long it is, and where its piece starts and ends.
    origin, length = (y, height) if vertical else (x, width)
    piece_start, piece_end = (top, bottom) if vertical else (left, right)
    span = piece_end - piece_start
    if vertical and upright == cv2.ROTATE_90_CLOCKWISE:
        # Turned clockwise, the piece's first column is the line's bottom row (counter-clockwise, its top row).
        first, last = piece_end - reading.end * span, piece_end - reading.start * span
    else:
        first, last = piece_start + reading.start * span, piece_start + reading.end * span
    reach = min(width, height) / 2
    start, end = max(origin, int(first - reach)), min(origin + length, int(np.ceil(last + reach)))
    return (x, start, width, max(1, end - start)) if vertical else (start, y, max(1, end - start), height)


def _onward(shape: tuple[int, ...], part: Box, vertical: bool) -> list[Box]:
    """The stretches of `part`'s row (column, if its line runs `vertical`ly: a part read may be as long as thick)
    before and after it in an image of `shape`, each up to _ONWARD_THICKNESSES of its thicknesses long and at least two
    (shorter, it would not run the same way)."""
    x, y, width, height = part
    thickness = width if vertical else height
    start, end, size = (y, y + height, shape[0]) if vertical else (x, x + width, shape[1])
    reach = round(_ONWARD_THICKNESSES * thickness)
    spans = [(max(0, start - reach), start), (end, min(size, end + reach))]
    return [(x, first, width, last - first) if vertical else (first, y, last - first, height)
            for first, last in spans if last - first >= 2 * thickness]


def _first_part(line: Box, thicknesses: float) -> Box:
    """`line`, if longer than this many `thicknesses`, cut to its first part so long (its left end, or its top)."""
    x, y, width, height = line
    length = round(thicknesses * min(width, height))
    return (x, y, min(width, length), height) if width >= height else (x, y, width, min(height, length))


class _Strokes(NamedTuple):
    """A piece that looks like a row of strokes (see _stroke_test)."""

    #: One threshold for the whole piece (Otsu) split its ink from its background; else only a local one did.
    split_whole: bool
    #: Changes between ink and background per height of length along its middle rows.
    changes: float


def _stroke_test(piece: np.ndarray, *, locally: bool) -> _Strokes | None:
    """Whether `piece` (BGR, one line of text upright, or not text at all) looks like a row of strokes, in grey or, if
    it is in colour, in any of its channels: split into ink and background by one threshold for the whole piece
    (Otsu) or, failing that and if `locally`, by each pixel's neighbourhood (see _LOCAL_SPLIT_PX). None if no split of
    any plane passes _strokes_in (see _MAX_SEEN_SHARE)."""
    grey = cv2.cvtColor(piece, cv2.COLOR_BGR2GRAY)
    planes = [grey]
    if _in_colour(piece, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)):
        planes += cv2.split(piece)
    scale = _STROKE_TEST_HEIGHT_PX / grey.shape[0]
    width = max(1, round(grey.shape[1] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    planes = [cv2.resize(plane, (width, _STROKE_TEST_HEIGHT_PX), interpolation=interpolation) for plane in planes]
    for split_whole in (True, False) if locally else (True,):
        changes = [_strokes_in(plane, _split(plane, split_whole)) for plane in planes]
        passed = [count for count in changes if count is not None]
        if passed:
            return _Strokes(split_whole, max(passed))
    return None


def _split(plane: np.ndarray, whole: bool) -> np.ndarray:
    """`plane` split into ink and background (0/1, either side may be the ink): by one threshold for all of it (Otsu),
    or each pixel against the mean of its neighbourhood (see _LOCAL_SPLIT_PX)."""
    if whole:
        return cv2.threshold(plane, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    return cv2.adaptiveThreshold(plane, 1, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, _LOCAL_SPLIT_PX, 0)


def _strokes_in(plane: np.ndarray, ink: np.ndarray) -> float | None:
    """The changes between `ink` and background per height of length along the middle rows of `plane` (scaled to
    _STROKE_TEST_HEIGHT_PX tall). None when they are fewer than _MIN_STROKE_CHANGES, when its columns change fewer than
    _MIN_COLUMN_CHANGES times on average, or when its edges across the line are not _MIN_ACROSS_EDGES to
    _MAX_ACROSS_EDGES times those along it (see _MAX_SEEN_SHARE)."""
    width = plane.shape[1]
    middle = ink[_STROKE_TEST_HEIGHT_PX // 4 : 3 * _STROKE_TEST_HEIGHT_PX // 4]
    # Whichever side is ink, each change is one edge of a stroke.
    changes = np.count_nonzero(middle[:, 1:] != middle[:, :-1]) / len(middle) / width * _STROKE_TEST_HEIGHT_PX
    if changes < _MIN_STROKE_CHANGES or np.count_nonzero(ink[1:] != ink[:-1]) < _MIN_COLUMN_CHANGES * width:
        return None
    across = float(np.abs(cv2.Sobel(plane, cv2.CV_32F, 1, 0)).sum())
    along = float(np.abs(cv2.Sobel(plane, cv2.CV_32F, 0, 1)).sum())
    if not _MIN_ACROSS_EDGES * along <= across <= _MAX_ACROSS_EDGES * along:
        return None
    return float(changes)


def _reading_order(windows: list[Box], tests: list[_Strokes | None]) -> list[int]:
    """The order in which to read `windows` that passed their stroke `tests` (see _MAX_UNSEEN_READS): those split by
    one threshold (the surer sign) before those split only locally; within each, each place before any place again
    (the line search finds one line of text at several thresholds: see _SAME_PLACE_SHARE), the most changes along
    first."""
    stroked = sorted(((test, index) for index, test in enumerate(tests) if test is not None),
                     key=lambda item: -item[0].changes)
    order: list[int] = []
    for split_whole in (True, False):
        places: list[int] = []
        again: list[int] = []
        for index in (index for test, index in stroked if test.split_whole is split_whole):
            read_before = any(_same_place(windows[index], windows[other]) for other in order + places)
            (again if read_before else places).append(index)
        order += places + again
    return order


def _same_place(first: Box, second: Box) -> bool:
    """Whether two lines overlap by more than _SAME_PLACE_SHARE of the smaller."""
    return _overlap(first, second) > _SAME_PLACE_SHARE * min(first[2] * first[3], second[2] * second[3])


def _covered_shares(lines: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """The share of each of `lines` (x, y, w, h rows) that lies inside any of `boxes`."""
    shares = np.zeros(len(lines))
    if not boxes or not len(lines):
        return shares
    other = np.array(boxes, np.int64)
    left, top, right, bottom = other[:, 0], other[:, 1], other[:, 0] + other[:, 2], other[:, 1] + other[:, 3]
    # In chunks: a texture can make thousands of lines and hundreds of boxes.
    for start in range(0, len(lines), 1024):
        chunk = lines[start : start + 1024]
        x, y, width, height = (chunk[:, column, None] for column in range(4))
        across = np.minimum(x + width, right) > np.maximum(x, left)
        touching = across & (np.minimum(y + height, bottom) > np.maximum(y, top))
        for row in np.flatnonzero(touching.any(axis=1)):
            line_x, line_y, line_width, line_height = (int(value) for value in chunk[row])
            inside = np.zeros((line_height, line_width), bool)
            # The boxes in the line's own coordinates: each touches it, so each ends inside or beyond it.
            for box_x, box_y, box_width, box_height in other[touching[row]] - [line_x, line_y, 0, 0]:
                inside[max(0, box_y) : box_y + box_height, max(0, box_x) : box_x + box_width] = True
            shares[start + row] = inside.mean()
    return shares


def _row_parts(image: np.ndarray, line: Box) -> list[Box]:
    """`line` cut in two across its text, at its quietest row in the middle band: between two lines of text."""
    x, y, width, height = line
    piece = image[y : y + height, x : x + width]
    grey = cv2.cvtColor(piece, cv2.COLOR_BGR2GRAY) if piece.ndim == 3 else piece
    vertical = height > _VERTICAL_ASPECT * width
    if vertical:
        grey = cv2.rotate(grey, cv2.ROTATE_90_CLOCKWISE)
    rows = grey.shape[0]
    low, high = int(rows * _ROW_CUT_BAND[0]), max(int(rows * _ROW_CUT_BAND[1]), int(rows * _ROW_CUT_BAND[0]) + 1)
    cut = low + int(np.argmin(grey[low:high].astype(np.float32).std(axis=1)))
    halves = ((0, cut), (cut, rows))
    # The turned piece's rows are the image's columns, left to right.
    return [(x + start, y, end - start, height) if vertical else (x, y + start, width, end - start)
            for start, end in halves]


def _soft(image: np.ndarray, line: Box) -> bool:
    """Whether `line` of `image` has no edge as steep as burned-in ink's in any channel (see _MIN_EDGE_STEEPNESS)."""
    x, y, width, height = line
    piece = image[y : y + height, x : x + width]
    if min(piece.shape[:2]) < 2:
        return False
    window = np.ones((_EDGE_WINDOW_PX, _EDGE_WINDOW_PX), np.uint8)
    for plane in cv2.split(piece[:, :, :3]) if piece.ndim == 3 else [piece]:
        steps = np.concatenate([cv2.absdiff(plane[:, 1:], plane[:, :-1]).ravel(),
                                cv2.absdiff(plane[1:], plane[:-1]).ravel()])
        ranges = cv2.morphologyEx(plane, cv2.MORPH_GRADIENT, window)
        steepest, widest = _percentiles(steps, (_EDGE_PERCENTILE,))[0], _percentiles(ranges, (_EDGE_PERCENTILE,))[0]
        if steepest >= _MIN_EDGE_STEEPNESS * max(_MIN_RANGE_LEVELS, widest):
            return False
    return True


def _runs_vertically(line: Box) -> bool:
    """Whether the recognizer reads `line` turned: it is much taller than wide."""
    short, long = sorted(line[2:])
    return line[3] > _VERTICAL_ASPECT * line[2] and long > _MIN_LINE_ASPECT * short


def _bgr(eight_bit: np.ndarray) -> np.ndarray:
    """BGR of 8-bit pixels, as the models read them (grey replicated; alpha dropped)."""
    if eight_bit.ndim == 2:
        return cv2.cvtColor(eight_bit, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(eight_bit[:, :, :3])


def _in_colour(piece: np.ndarray, grey: np.ndarray) -> bool:
    """Whether BGR `piece` is in colour: a channel differs from `grey` (its grey, BGR) by over _COLOUR_LEVELS."""
    return int(cv2.absdiff(piece, grey).max()) > _COLOUR_LEVELS


def _stretched(piece: np.ndarray) -> np.ndarray:
    """`piece` with its grey levels stretched to 0..255 (the 1st to 99th percentile): faint text becomes plain."""
    low, high = _percentiles(piece, (1, 99))
    if high - low < _MIN_CROP_RANGE:
        return piece
    return cv2.convertScaleAbs(piece, alpha=255.0 / (high - low), beta=-low * 255.0 / (high - low))


def _percentiles(eight_bit: np.ndarray, percents: tuple[float, ...]) -> list[float]:
    """np.percentile of 8-bit pixels (its default, linear interpolation), from their histogram: a few times
    faster than sorting them, which np.percentile does."""
    cumulative = np.cumsum(np.bincount(eight_bit.ravel(), minlength=256))
    count = int(cumulative[-1])
    values = []
    for percent in percents:
        position = percent / 100 * (count - 1)
        below = int(position)
        # The k-th smallest pixel (from 0) is the first level whose cumulative count exceeds k.
        low, high = np.searchsorted(cumulative, (below, min(below + 1, count - 1)), side="right")
        values.append(float(low + (position - below) * (high - low)))
    return values


def _crops(image: np.ndarray, proposals: list[tuple[Box, float]]) -> list[tuple[_Crop, np.ndarray]]:
    """Each proposal's crop, turned and scaled for the detector, with its pixels (not yet placed in a mosaic).
    A proposal comes with the typical height of the text lines the line search found in it."""
    height, width = image.shape[:2]
    crops = []
    for (x, y, w, h), text_height in proposals:
        margin = round(min(_MAX_CROP_MARGIN_PX, max(_CROP_MARGIN_PX, _CROP_MARGIN_LINES * text_height)))
        left, top = max(0, x - margin), max(0, y - margin)
        right, bottom = min(width, x + w + margin), min(height, y + h + margin)
        if right <= left or bottom <= top:
            continue
        # Grey stays one channel until the crop is scaled: a proposal can span most of a 100-megapixel image, and
        # each full-resolution copy made colour would be three times as large.
        piece = image[top:bottom, left:right]
        piece = piece[:, :, :3] if piece.ndim == 3 else piece
        # Where the image's edge cuts the margin off, the crop gets it as plain background: the detector
        # misses text that touches its input's edge (a film's `R` or `A-P` burned flush with the border).
        pads = (top - (y - margin), (y + h + margin) - bottom, left - (x - margin), (x + w + margin) - right)
        edge = tuple(min(pad, _EDGE_PAD_PX) if pad > 0 else 0 for pad in pads)
        if any(edge):
            # The background's median, from a sample of at most about a megapixel (every pixel of smaller crops).
            step = max(1, int(np.ceil(np.sqrt(piece.shape[0] * piece.shape[1] / _MEDIAN_SAMPLE_PIXELS))))
            sample = np.ascontiguousarray(piece[::step, ::step])
            channels = cv2.split(sample) if sample.ndim == 3 else [sample]
            background = [int(_percentiles(channel, (50,))[0]) for channel in channels]
            piece = cv2.copyMakeBorder(piece, *edge, cv2.BORDER_CONSTANT, value=background)
            left, top, right, bottom = left - edge[2], top - edge[0], right + edge[3], bottom + edge[1]
        turned = h > _VERTICAL_ASPECT * w
        area = piece.shape[0] * piece.shape[1]
        text_height = max(1.0, text_height)
        scale = min(1.0, _TEXT_HEIGHT_PX / text_height, float(np.sqrt(_MAX_CROP_PIXELS / area)))
        if area * scale**2 > _LARGE_CROP_PIXELS:
            scale = min(scale, max(_LARGE_CROP_TEXT_HEIGHT_PX / text_height, float(np.sqrt(_LARGE_CROP_PIXELS / area))))
        if turned:
            piece = cv2.rotate(piece, cv2.ROTATE_90_CLOCKWISE)
        if scale < 1.0:
            size = (max(1, round(piece.shape[1] * scale)), max(1, round(piece.shape[0] * scale)))
            piece = cv2.resize(piece, size, interpolation=cv2.INTER_AREA)
        crop = _Crop(left, top, right - left, bottom - top, scale, turned, text_height, 0, 0, piece.shape[1],
                     piece.shape[0])
        crops.append((crop, _stretched(_bgr(piece))))
    return crops


def _verification_crops(
    image: np.ndarray, proposals: list[tuple[Box, float]], within_blocks: list[tuple[Box, float]]
) -> list[tuple[_Crop, np.ndarray]]:
    """The crops the detector reads: the proposals', and those of the lines of text size inside blocks, unless their
    block's crop shows their text large enough already."""
    crops = _crops(image, proposals)
    crops += [(crop, piece) for crop, piece in _crops(image, within_blocks)
              if not any(_holds(block, crop) for block, _ in crops)]
    return crops


def _down_crops(
    image: np.ndarray, down_blocks: list[tuple[Box, float]], crops: list[tuple[_Crop, np.ndarray]], budget: int
) -> list[tuple[_Crop, np.ndarray]]:
    """The crops of the groups of lines running down blocks (_block_lines' second list) that no crop of `crops`
    shows already, within `budget` pixels: a second look, where the verification budget allows it."""
    unseen = [(crop, piece) for crop, piece in _crops(image, down_blocks)
              if not any(_holds(block, crop) for block, _ in crops)]
    return _affordable(unseen, budget)


def _affordable(crops: list[tuple[_Crop, np.ndarray]], budget: int) -> list[tuple[_Crop, np.ndarray]]:
    """Of `crops`, in order, those that fit in what is left of `budget` pixels when their turn comes."""
    kept = []
    for crop, piece in crops:
        if crop.mosaic_pixels <= budget:
            budget -= crop.mosaic_pixels
            kept.append((crop, piece))
    return kept


def _block_lines(inside: np.ndarray) -> tuple[list[tuple[Box, float]], list[tuple[Box, float]]]:
    """The groups of lines of text size in a block (a proposal many of its lines' median thickness across: text
    touching textured anatomy, or a CT body the line search proposed whole), each with half its median thickness
    as the height of its text.

    Such a block's crop is scaled by its lines' median, which is the anatomy's, and turned by its outline, which
    says nothing of its text's direction: a name burned beside the body can come out too small to read, or on
    its side. Its lines no thicker than _BLOCK_LINE_THICKNESS times the thinner ones, grouped where they touch
    (padded by half their thickness), are read again as proposals of their own.

    The second list: the groups of those of them running down the block, grouped among themselves (those not
    already groups of the first). A date burned down a CT body, grouped with the stripes across it, was read as
    they are, on its side, and only its first word was found. Both groupings are read, since the line search's
    shapes do not always say which way text runs (a faint name across a body's stripes made blobs taller than
    wide)."""
    across = np.minimum(inside[:, 2], inside[:, 3])
    thick_enough = across >= _MIN_SCALING_LINE_PX
    if not thick_enough.any():
        return [], []
    limit = _BLOCK_LINE_THICKNESS * float(np.percentile(across[thick_enough], _BLOCK_THIN_PERCENTILE))
    chosen = thick_enough & (across <= limit)
    lines, across = inside[chosen].astype(np.int64), across[chosen]
    pad = np.ceil(across / 2).astype(np.int64)
    padded = np.stack([lines[:, 0] - pad, lines[:, 1] - pad, lines[:, 0] + lines[:, 2] + pad,
                       lines[:, 1] + lines[:, 3] + pad], 1)
    groups = _touching_groups(padded)
    down = np.flatnonzero(lines[:, 3] > _VERTICAL_ASPECT * lines[:, 2])
    known = {tuple(members) for members in groups}  # both in ascending order (_components)
    down_groups = [members for group in _touching_groups(padded[down])
                   if tuple(members := down[group].tolist()) not in known]

    def described(members: list[int]) -> tuple[Box, float]:
        group = lines[members]
        x0, y0 = group[:, 0].min(), group[:, 1].min()
        x1, y1 = (group[:, 0] + group[:, 2]).max(), (group[:, 1] + group[:, 3]).max()
        # Read as if its lines were half as thick: next to anatomy the search often sees two or three lines of a
        # name as one, and a crop scaled by that thickness shows each too small to read.
        return (int(x0), int(y0), int(x1 - x0), int(y1 - y0)), float(np.median(across[members])) / 2

    return [described(members) for members in groups], [described(members) for members in down_groups]


def _touching_groups(boxes: np.ndarray) -> list[list[int]]:
    """The groups of `boxes` (left, top, right, bottom rows) that overlap, directly or through others (see
    _components). A photo's texture makes thousands of lines in one block: the pairs are found through the boxes
    sorted by top, not in a boxes x boxes matrix."""
    by_top = np.argsort(boxes[:, 1], kind="stable")
    sorted_tops = boxes[by_top, 1]
    tallest = int((boxes[:, 3] - boxes[:, 1]).max()) if len(boxes) else 0
    pairs = []
    for index, (left, top, right, bottom) in enumerate(boxes):
        near = by_top[np.searchsorted(sorted_tops, top - tallest) : np.searchsorted(sorted_tops, bottom)]
        near = near[near > index]
        overlapping = near[(boxes[near, 0] < right) & (left < boxes[near, 2]) & (boxes[near, 1] < bottom)
                           & (top < boxes[near, 3])]
        pairs += [(index, int(other)) for other in overlapping]
    return _components(len(boxes), pairs)


def _components(count: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The connected groups of `count` items joined by `pairs` (union-find), each in ascending order, in order of
    their first member."""
    parent = list(range(count))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for first, second in pairs:
        parent[root(second)] = root(first)
    groups: dict[int, list[int]] = {}
    for index in range(count):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def _holds(block: _Crop, crop: _Crop) -> bool:
    """Whether `block`'s crop already shows `crop`'s text as the detector reads it: the same way up (it misses
    vertical text it is not shown upright), nearly all of `crop` inside it, and its text at least
    _LARGE_CROP_TEXT_HEIGHT_PX tall there (or as tall as in `crop` itself)."""
    across = min(block.left + block.width, crop.left + crop.width) - max(block.left, crop.left)
    down = min(block.top + block.height, crop.top + crop.height) - max(block.top, crop.top)
    return (
        block.turned == crop.turned
        and max(0, across) * max(0, down) >= _HELD_SHARE * crop.width * crop.height
        and crop.text_height * block.scale >= min(_LARGE_CROP_TEXT_HEIGHT_PX, crop.text_height * crop.scale)
    )


def _mosaic_groups(crops: list[tuple[_Crop, np.ndarray]]) -> list[list[tuple[_Crop, np.ndarray]]]:
    """`crops` in groups of at most _MAX_MOSAIC_PIXELS (tallest first), one mosaic each."""
    groups: list[list[tuple[_Crop, np.ndarray]]] = []
    pixels = 0
    for item in sorted(crops, key=lambda item: -item[0].mosaic_height):
        area = item[0].mosaic_pixels
        if not groups or pixels + area > _MAX_MOSAIC_PIXELS:
            groups.append([])
            pixels = 0
        groups[-1].append(item)
        pixels += area
    return groups


def _mosaic(crops: list[tuple[_Crop, np.ndarray]]) -> tuple[np.ndarray, list[_Crop]]:
    """The crops packed on shelves into one image, for one detector run; and each crop with its place there.
    The detector's cost follows the mosaic's area, so of a few widths the one that wastes least is taken."""
    ordered = sorted(crops, key=lambda item: -item[0].mosaic_height)
    widest = max(crop.mosaic_width for crop, _ in ordered)
    total = sum(crop.mosaic_width + _MOSAIC_GAP_PX for crop, _ in ordered)
    stride = _DETECTOR_STRIDE
    widths = {widest, *range(-(-widest // stride) * stride, total + stride, stride)}
    packings = [(width, *_shelves(ordered, width)) for width in widths]
    width, places, height = min(packings, key=lambda packing: -(-packing[0] // stride) * -(-packing[2] // stride))
    mosaic = np.zeros((-(-height // stride) * stride, -(-width // stride) * stride, 3), np.uint8)
    placed = []
    for (x, y), (crop, piece) in zip(places, ordered, strict=True):
        mosaic[y : y + crop.mosaic_height, x : x + crop.mosaic_width] = piece
        placed.append(replace(crop, x=x, y=y))
    return mosaic, placed


def _shelves(ordered: list[tuple[_Crop, np.ndarray]], width: int) -> tuple[list[tuple[int, int]], int]:
    """Where each crop goes (tallest first), left to right on shelves at most `width` wide; and the height used."""
    places = []
    x = y = shelf = 0
    for crop, _ in ordered:
        if x and x + crop.mosaic_width > width:
            x, y, shelf = 0, y + shelf + _MOSAIC_GAP_PX, 0
        places.append((x, y))
        x += crop.mosaic_width + _MOSAIC_GAP_PX
        shelf = max(shelf, crop.mosaic_height)
    return places, y + shelf


def _crop_holding(crops: list[_Crop], region: TextRegion) -> _Crop | None:
    centre_x, centre_y = region.x + region.width / 2, region.y + region.height / 2
    for crop in crops:
        if crop.x <= centre_x < crop.x + crop.mosaic_width and crop.y <= centre_y < crop.y + crop.mosaic_height:
            return crop
    return None


def _to_image(box: Box, crop: _Crop) -> Box:
    """A box of the mosaic, clipped to its crop, in image coordinates."""
    x, y, width, height = box
    left = max(x, crop.x) - crop.x
    top = max(y, crop.y) - crop.y
    right = min(x + width, crop.x + crop.mosaic_width) - crop.x
    bottom = min(y + height, crop.y + crop.mosaic_height) - crop.y
    # Undo the scaling, then the turn (clockwise: a turned crop's x runs down the original, its y right to left).
    left, top, right, bottom = (int(np.floor(left / crop.scale)), int(np.floor(top / crop.scale)),
                                int(np.ceil(right / crop.scale)), int(np.ceil(bottom / crop.scale)))
    if crop.turned:
        left, top, right, bottom = top, crop.height - right, bottom, crop.height - left
    left, top = max(0, left), max(0, top)
    right, bottom = min(crop.width, right), min(crop.height, bottom)
    return crop.left + left, crop.top + top, right - left, bottom - top


def _within(box: Box, shape: tuple[int, ...]) -> Box:
    """`box` clipped to the image (a crop padded beyond the image's edge may find a line reaching into the pad)."""
    x, y, width, height = box
    left, top = max(0, x), max(0, y)
    right, bottom = min(shape[1], x + width), min(shape[0], y + height)
    return left, top, max(0, right - left), max(0, bottom - top)


def _padded_pieces(line: Box, pieces: tuple[Box, ...], proposed_lines: np.ndarray, shape: tuple[int, ...]) -> list[Box]:
    """The boxes that redact `line`: its pieces (see TextDetector._verified; `line` alone for most), each padded
    across the line for its own thickness and along it as the line is; the first and the last piece reach as far
    as the line's ends do (see _end_pads)."""
    start_pad, end_pad = _end_pads(line, proposed_lines)
    inner_pad = _pad(min(line[2], line[3]))
    boxes = []
    for index, piece in enumerate(pieces):
        start = start_pad if index == 0 else inner_pad
        end = end_pad if index == len(pieces) - 1 else inner_pad
        if line[2] >= line[3]:
            across = _pad(piece[3])
            boxes.append(_padded_by(piece, shape, start, across, end, across))
        else:
            across = _pad(piece[2])
            boxes.append(_padded_by(piece, shape, across, start, across, end))
    return boxes


def _end_pads(line: Box, proposed_lines: np.ndarray) -> tuple[int, int]:
    """The redaction padding before and after `line` along it (left and right, or above and below): _pad, or as far
    as a line the line search found across the same band runs on beyond that end (see _MAX_END_PAD_FRACTION)."""
    width, height = line[2:]
    thickness = min(width, height)
    pad = _pad(thickness)
    if max(width, height) < _MIN_END_PADDED_ASPECT * thickness or not len(proposed_lines):
        return pad, pad
    reach = max(pad, round(_MAX_END_PAD_FRACTION * thickness))
    # Along and across the line, for it and for the line search's lines.
    along, across = (0, 1) if width >= height else (1, 0)
    start, end = line[along], line[along] + line[along + 2]
    low, high = line[across], line[across] + line[across + 2]
    starts, ends = proposed_lines[:, along], proposed_lines[:, along] + proposed_lines[:, along + 2]
    lows, highs = proposed_lines[:, across], proposed_lines[:, across] + proposed_lines[:, across + 2]
    same_band = np.minimum(high, highs) - np.maximum(low, lows) >= np.maximum(high - low, highs - lows) / 2
    before = same_band & (starts < start - pad) & (ends > start - reach)
    after = same_band & (ends > end + pad) & (starts < end + reach)
    start_pad = min(reach, start - int(starts[before].min()) + _MIN_PAD_PX) if before.any() else pad
    end_pad = min(reach, int(ends[after].max()) - end + _MIN_PAD_PX) if after.any() else pad
    return start_pad, end_pad


def _pad(thickness: int) -> int:
    """Redaction padding around text this thick (see _PAD_FRACTION)."""
    return max(_MIN_PAD_PX, round(_PAD_FRACTION * thickness))


def _padded_by(box: Box, shape: tuple[int, ...], pad_left: int, pad_top: int, pad_right: int, pad_bottom: int) -> Box:
    x, y, width, height = box
    left, top = max(0, x - pad_left), max(0, y - pad_top)
    right, bottom = min(shape[1], x + width + pad_right), min(shape[0], y + height + pad_bottom)
    return left, top, right - left, bottom - top


def _text_height(lines: np.ndarray, box: Box) -> float:
    """The height of the text in `box`, for scaling its crop: the typical thickness of the line search's `lines` there
    (the detector still reads text at half that height); specks too small to be a line of text (noise beside a
    film's marker) have no say, and without lines the box's shorter side stands for it."""
    across = np.minimum(lines[:, 2], lines[:, 3])
    lines_of_text = across >= _MIN_SCALING_LINE_PX
    across = across[lines_of_text] if lines_of_text.any() else across
    return float(np.median(across)) if len(across) else float(min(box[2], box[3]))


def _line_shaped(lines: np.ndarray) -> np.ndarray:
    """Which of `lines` (x, y, w, h rows) of the line search may be text running on (see _RUN_ON_HEIGHTS, and
    _MAX_UNSEEN_READS): thick enough, and long."""
    short, long = lines[:, 2:4].min(axis=1), lines[:, 2:4].max(axis=1)
    return (short >= _MIN_SCALING_LINE_PX) & (long >= _MIN_LINE_ASPECT * short)


def _run_on(line: Box, found: list[Box]) -> tuple[Box, float] | None:
    """The longest part of `line` beyond the text found in its row (its column, if it runs vertically) that runs
    the same way, if at least _RUN_ON_HEIGHTS of that text's heights long; with that height."""
    vertical = line[3] > line[2]
    # The axis along the line (0: x, 1: y).
    along = 1 if vertical else 0
    start, end = line[along], line[along] + line[along + 2]
    beside = [text for text in found if (text[3] > text[2]) == vertical and _overlap(line, text)]
    if not beside:
        return None
    height = float(min(min(text[2:]) for text in beside))
    covered = sorted((max(start, text[along]), min(end, text[along] + text[along + 2])) for text in beside)
    gaps, reached = [], start
    for low, high in covered:
        gaps.append((reached, low))
        reached = max(reached, high)
    gaps.append((reached, end))
    low, high = max(gaps, key=lambda gap: gap[1] - gap[0])
    if high - low < _RUN_ON_HEIGHTS * height:
        return None
    if vertical:
        return (line[0], low, line[2], high - low), height
    return (low, line[1], high - low, line[3]), height


def _glyph_shaped(line: np.ndarray) -> bool:
    """A blob of the line search that may be one letter: about as tall as wide, and tall enough to read."""
    width, height = int(line[2]), int(line[3])
    return min(width, height) >= _MIN_GLYPH_PX and max(width, height) <= _MAX_GLYPH_ASPECT * min(width, height)


def _lone_letter(lines: np.ndarray) -> Box | None:
    """The box of the one letter `lines` are (the search finds a letter more than once: bright and dark, along
    and across), or None when they are more than one letter."""
    if not len(lines):
        return None
    left, top = lines[:, 0].min(), lines[:, 1].min()
    right, bottom = (lines[:, 0] + lines[:, 2]).max(), (lines[:, 1] + lines[:, 3]).max()
    union = np.array([left, top, right - left, bottom - top])
    if not _glyph_shaped(union) or union[2] * union[3] > _LONE_LETTER_SPREAD * (lines[:, 2] * lines[:, 3]).max():
        return None
    return int(left), int(top), int(union[2]), int(union[3])


def _deduplicated(lines: list[Box]) -> list[Box]:
    """One box per line: overlapping proposals put the same line in two crops."""
    kept: list[Box] = []
    for line in sorted(lines, key=lambda box: -box[2] * box[3]):
        if not any(_overlap(line, other) >= 0.6 * line[2] * line[3] for other in kept):
            kept.append(line)
    return kept


def _overlap(first: Box, second: Box) -> int:
    across = min(first[0] + first[2], second[0] + second[2]) - max(first[0], second[0])
    down = min(first[1] + first[3], second[1] + second[3]) - max(first[1], second[1])
    return max(0, across) * max(0, down)


def _is_marker(read: str, confidence: float) -> bool:
    return read in MARKERS and confidence >= _MARKER_MIN_CONFIDENCE


def _rows(lines: list[Box], group: list[int]) -> list[list[int]]:
    """The group's lines by rows (lines side by side, overlapping vertically by half the lower one), each row left
    to right."""
    rows: list[list[int]] = []
    for index in sorted(group, key=lambda index: lines[index][1] + lines[index][3] / 2):
        y, height = lines[index][1], lines[index][3]
        row = rows[-1] if rows else None
        if row is not None:
            top = max(lines[other][1] for other in row)
            bottom = min(lines[other][1] + lines[other][3] for other in row)
            if min(bottom, y + height) - max(top, y) >= 0.5 * min(height, *(lines[other][3] for other in row)):
                row.append(index)
                continue
        rows.append([index])
    return [sorted(row, key=lambda index: lines[index][0]) for row in rows]


def _words(row: list[int], lines: list[Box]) -> list[list[int]]:
    """A row's lines (left to right) in runs set at most _LETTER_GAP of the lower one's height apart: the letters of
    one word that the detector found apart."""
    words: list[list[int]] = []
    for index in row:
        if words:
            previous = lines[words[-1][-1]]
            gap = lines[index][0] - (previous[0] + previous[2])
            if gap <= _LETTER_GAP * min(previous[3], lines[index][3]):
                words[-1].append(index)
                continue
        words.append([index])
    return words


def _reads_as_unseen_text(reading: Reading) -> bool:
    """Whether a line the detector saw nothing in reads as text (see _MIN_UNSEEN_CHARACTERS and
    _MIN_DISTINCT_CHARACTERS)."""
    if len(set(reading.text)) >= _MIN_DISTINCT_CHARACTERS:
        return reading.confidence >= _MIN_DISTINCT_CONFIDENCE
    return len(reading.text) >= _MIN_UNSEEN_CHARACTERS and reading.confidence >= _MIN_UNSEEN_CONFIDENCE


def _reads_on_as_text(reading: Reading) -> bool:
    """Whether the row (column) beyond text read reads as text too (see _MIN_ONWARD_CHARACTERS)."""
    return _reads_as_unseen_text(reading) or (
        len(reading.text) >= _MIN_ONWARD_CHARACTERS and reading.confidence >= _MIN_UNSEEN_CONFIDENCE
    )


def _reads_as_text(read: str, confidence: float) -> bool:
    """Whether a reading of a squat region (or of its word) is text: two characters or more, with conviction."""
    return len(read) >= 2 and confidence >= _MIN_READ_CONFIDENCE


def _towers_over(index: int, word: list[int], lines: list[Box]) -> bool:
    """Whether line `index` is more than _MAX_LETTER_HEIGHTS times as tall as each other line of its `word`."""
    return len(word) > 1 and all(lines[index][3] > _MAX_LETTER_HEIGHTS * lines[other][3]
                                 for other in word if other != index)


def _bands_through(region: Box, text_lines: list[Box]) -> list[Box]:
    """The parts of `region` that the rows of `text_lines` (the text of its word, beside it in its row) run through:
    text running up to anatomy may run on into it (a faint name crossing a brain's ventricles is found as part of
    them)."""
    x, y, width, height = region
    bands = []
    for _, text_y, _, text_height in text_lines:
        top, bottom = max(y, text_y), min(y + height, text_y + text_height)
        if bottom > top:
            bands.append((x, top, width, bottom - top))
    return bands


def _row_reading(row: list[int], lines: list[Box], readings: dict[int, tuple[str, float]]) -> tuple[str, float]:
    """What a row reads, its lines' readings joined left to right (unread lines read as nothing), and the least
    confidence among them."""
    read = [readings[index] for index in row if index in readings and readings[index][0]]
    if not read:
        return "", 0.0
    return "".join(text for text, _ in read), min(confidence for _, confidence in read)


def _groups(lines: list[Box]) -> list[list[int]]:
    """Indices of the lines, grouped: two lines closer than _MARKER_ISOLATION of the thinner one's height (its
    shorter side) are in one group."""
    pairs = []
    for first, (x, y, width, height) in enumerate(lines):
        for second in range(first + 1, len(lines)):
            ox, oy, ow, oh = lines[second]
            # By the thinner of the two: a large squat region (a block of anatomy the detector found) must not
            # reach out over a marker far away.
            reach = _MARKER_ISOLATION * min(width, height, ow, oh)
            gap_x = max(ox - (x + width), x - (ox + ow), 0)
            gap_y = max(oy - (y + height), y - (oy + oh), 0)
            if max(gap_x, gap_y) < reach:
                pairs.append((first, second))
    return _components(len(lines), pairs)

