"""Real radiology report text (Indiana University / Open-I, CC BY-NC-ND 4.0) turned into prompts.

The 3,955 IU report XMLs ship inside torchxrayvision (`assets.iu_reports()`); they are read at run
time and never copied into the repository. Two uses:

* `pick_report` chooses a whole real report (FINDINGS + IMPRESSION) whose content agrees with a
  real image's label (normal / pneumonia / multiple nodules).
* `drr_prompt` builds the prompt of a simulated radiograph: a real IU sentence that states the
  rendered finding (strict regex filters: right place, not negated, not hedged, no comparison with a
  prior study, no other finding), optionally with real sentences from normal IU reports about the
  structures the finding leaves alone. When no real sentence fits it falls back to a template and
  says so. The finding's severity is read from the sentence ("small", "moderate", "large", "2 cm"),
  so the image shows what the text says.

The pairing of text with image is constructed here; the texts are real, the pairs are not.
"""

from __future__ import annotations

import functools
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memcontrol import assets
from memcontrol.data.drr import LOBES, Finding

MAX_WORDS = 60

LOBE_NAMES = {
    "rul": "right upper lobe", "rml": "right middle lobe", "rll": "right lower lobe",
    "lul": "left upper lobe", "lll": "left lower lobe",
}
_LOBE_RE = {
    "rul": r"right upper lobe|right apical|right apex",
    "rml": r"right middle lobe",
    "rll": r"right lower lobe|right (?:lung )?bas(?:e|ilar|al)",
    "lul": r"left upper lobe|lingula",
    "lll": r"left lower lobe|left (?:lung )?bas(?:e|ilar|al)|retrocardiac",
}
_NEGATED = re.compile(
    r"\b(no|not|without|negative|resolv\w*|resolution|clear\w*|improv\w*|decreas\w*|removed|free|"
    r"absen\w*|exclude\w*|rule\w* out|normal)\b", re.I)
_HEDGED_OR_COMPARED = re.compile(
    r"\b(versus|vs|or|and/or|possibl\w*|question\w*|may|might|cannot|could|suspect\w*|concern\w*|"
    r"likely|probabl\w*|consider\w*|interval|previous\w*|prior|stable|unchanged|again|"
    r"redemonstrat\w*|compar\w*|since|persist\w*|new|old|chronic|healed|post\w*|status|"
    r"recommend\w*|follow\w*|correlat\w*|ct|lateral|continu\w*|develop\w*|increas\w*|recurr\w*|"
    r"remains?|residual|associated|also|additionally|well|elevat\w*|volumes?|aeration|hypertension|"
    r"similar|atheroscl\w*)\b",
    re.I)
# incidental findings that MeSH "normal" reports sometimes still mention
_INCIDENTAL = re.compile(
    r"degenerat|arthrit|scoliosis|spondyl|osteophyte|granulom|calcif|scar|tortuous|atelecta|"
    r"hyperinfl|hyperexpan|emphysem|nipple|surg|cholecyst|deformit|kyphosis|fractur|remain|"
    r"stable|unchanged|again|prior|previous|interval|upper limits?|borderline|lumbar|:", re.I)
# findings other than the one a sentence is chosen for; each kind removes its own words below
_FINDING_WORDS = {
    "consolidation": r"consolidat\w*|airspace|air space|pneumonia|infiltrat\w*|opacit\w*",
    "effusion": r"effusions?|pleural fluid",
    "cardiomegaly": r"cardiomegaly|enlarg\w*|heart|cardiac",
    "nodule": r"nodul\w*",
    "other": r"atelecta\w*|edema|congest\w*|pneumothora\w*|fractur\w*|granulom\w*|calcif\w*|scar\w*|"
             r"emphysem\w*|hyperinfl\w*|hyperexpan\w*|catheter|tube|pacemaker|wire\w*|sternotomy|"
             r"surg\w*|hernia|mass\w*|tortuous|degenerat\w*|thicken\w*|collapse|volume loss|"
             r"bronch\w*|interstitial|vascular|pericardial|aort\w*|mediastin\w*|hil\w*|density|"
             r"densities|nipple|device|clip\w*",
}
_POSITIVE = {
    "consolidation": re.compile(r"consolidat|airspace (disease|opacit)|air space (disease|opacit)|"
                                r"pneumonia|infiltrat|opacit", re.I),
    "effusion": re.compile(r"pleural effusion|\beffusion\b|pleural fluid", re.I),
    "cardiomegaly": re.compile(r"cardiomegaly|(heart|cardiac silhouette|cardiac size|cardiac shadow)"
                               r"( size)? (is|are|appears) (\w+ )?enlarged|enlarged (heart|cardiac)", re.I),
    "nodule": re.compile(r"\bnodule\b", re.I),
}
_NOT_CARDIOMEGALY = re.compile(r"borderline|upper limits?|top normal|pericardial|mildly prominent", re.I)
_SEVERITY = [  # (regex, severity range) first match wins
    (re.compile(r"\b(massive|large|severe|marked\w*|sizable|extensive|dense)\b", re.I), (0.7, 1.0)),
    (re.compile(r"\b(moderate\w*)\b", re.I), (0.4, 0.7)),
    (re.compile(r"\b(small|tiny|trace|minimal|mild\w*|slight\w*|subtle|patchy|focal)\b", re.I), (0.05, 0.35)),
]
_SIZE = re.compile(r"(\d+(?:\.\d+)?)(?:\s*x\s*(\d+(?:\.\d+)?))?\s*(cm|mm)\b", re.I)


def _size_cm(sentence: str) -> float | None:
    """Largest dimension stated in a sentence ("2.2 x 1.6 cm" -> 2.2), in cm, or None."""
    m = _SIZE.search(sentence)
    if not m:
        return None
    value = max(float(m.group(1)), float(m.group(2) or 0.0))
    return value / 10.0 if m.group(3).lower() == "mm" else value
_COMPARISON_ANY = re.compile(
    r"\b(interval|previous\w*|prior|stable|unchanged|again|redemonstrat\w*|compar\w*|since|"
    r"persist\w*|new|old)\b", re.I)
_DEVICE = re.compile(r"catheter|tube|pacemaker|wire|sternotomy|surg|clip|device|port\b|picc|stent|"
                     r"prosthe|hardware|valve|cabg|icd|drain", re.I)

TEMPLATES = {
    "consolidation": ("{Lobe} consolidation.", "Airspace disease in the {lobe}.", "{Lobe} pneumonia.",
                      "Focal consolidation in the {lobe}."),
    "effusion": ("{Size} {side} pleural effusion.", "There is a {size} {side} pleural effusion."),
    "cardiomegaly": ("{Size} cardiomegaly.", "The heart is {size} enlarged."),
    "nodule": ("{cm} cm nodule in the {lobe}.", "There is a {cm} cm nodule in the {lobe}."),
}


@dataclass(frozen=True)
class Report:
    """One IU report. uid: "CXR<n>"; mesh: MeSH major terms ("normal" for normal studies)."""

    uid: str
    findings: str
    impression: str
    mesh: tuple[str, ...]

    @property
    def text(self) -> str:
        """FINDINGS then IMPRESSION, cleaned."""
        return " ".join(t for t in (self.findings, self.impression) if t)


def clean(text: str) -> str:
    """Whitespace collapsed, list numbers ("1. ") and doubled full stops removed."""
    text = re.sub(r"\s+", " ", text or "").strip()
    text = re.sub(r"(^|\s)\d+\.\s+(?=[A-Za-z])", r"\1", text)
    text = re.sub(r"\.(\s*\.)+", ".", text)
    text = re.sub(r"\s+([.,;])", r"\1", text)
    return text.strip()


def sentences(text: str) -> list[str]:
    """Split cleaned report text into sentences (each ending with a full stop)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", clean(text))
    return [p if p.endswith((".", "!", "?")) else p + "." for p in (q.strip() for q in parts) if p]


def n_words(text: str) -> int:
    return len(text.split())


@functools.lru_cache(maxsize=2)
def load_iu_reports(path: str | None = None) -> tuple[Report, ...]:
    """All IU reports in the tarball (default: the one installed with torchxrayvision), by uid order."""
    path = Path(path) if path else assets.iu_reports()
    out = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {a.get("Label"): clean(a.text or "") for a in root.iter("AbstractText")}
            uid = root.find("uId").get("id")
            mesh = tuple(e.text.strip() for e in root.iter("major") if e.text)
            out.append(Report(uid, sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""), mesh))
    return tuple(sorted(out, key=lambda r: int(r.uid[3:])))


# --------------------------------------------------------------------------- whole reports (real images)

_NOT_PNEUMONIA = re.compile(r"nodul|mass|tumor|neoplas|granulom|scar|effusion|atelecta|edema|"
                            r"cardiomegaly|enlarged", re.I)


def _states(text: str, rx: re.Pattern) -> bool:
    """True if a sentence of `text` matches `rx` without being negated ("no pleural effusion")."""
    return any(rx.search(s) and not _NEGATED.search(s) for s in sentences(text))


def _is_clean(text: str) -> bool:
    return "XXXX" not in text and not _DEVICE.search(text) and not _COMPARISON_ANY.search(text)


def _is_plain_normal(text: str) -> bool:
    return _is_clean(text) and not _INCIDENTAL.search(text)


def _fit(report: Report, keep: re.Pattern | None) -> str | None:
    """FINDINGS + IMPRESSION within MAX_WORDS, dropping trailing sentences that `keep` does not
    match (recommendations, incidental remarks); None if it cannot fit."""
    sents = sentences(report.findings) + sentences(report.impression)
    while sum(map(n_words, sents)) > MAX_WORDS:
        drop = [i for i, s in enumerate(sents) if keep is None or not keep.search(s)]
        if not drop:
            return None
        del sents[drop[-1]]
    return " ".join(sents) if sents else None


_REAL_LABELS = {
    # label -> (MeSH filter, regex the impression must match positively, regex kept when shortening)
    "normal": (lambda m: m == ("normal",), None, None),
    "pneumonia": (
        lambda m: bool(m) and all(t.split("/")[0] in {"Pneumonia", "Consolidation", "Airspace Disease",
                                                      "Opacity", "Infiltrate"} for t in m)
        and any(t.split("/")[0] in {"Pneumonia", "Consolidation", "Airspace Disease", "Infiltrate"} for t in m),
        re.compile(r"pneumonia|consolidation|airspace disease|air space disease|infiltrate", re.I),
        re.compile(r"pneumonia|consolidation|airspace|air space|infiltrat|opacit", re.I),
    ),
    "nodules": (
        lambda m: any(t.startswith(("Nodule", "Mass", "Neoplasm")) and ("multiple" in t or "bilateral" in t)
                      for t in m),
        # RG1 shows large round masses: "metastases", not "innumerable small nodules"
        re.compile(r"metasta", re.I),
        re.compile(r"nodul|mass|metasta", re.I),
    ),
}
REAL_LABELS = tuple(_REAL_LABELS)


def report_candidates(reports: tuple[Report, ...], label: str) -> list[tuple[Report, str]]:
    """(report, prompt text) pairs whose whole report agrees with a real image's `label`.

    normal: MeSH says normal; pneumonia: MeSH lists only airspace terms and the impression states
    pneumonia / consolidation / airspace disease without negation; nodules: multiple nodules or
    metastases. Comparison with prior studies and devices are only tolerated for "nodules" (one
    candidate in the whole corpus).
    """
    if label not in _REAL_LABELS:
        raise ValueError(f"label {label!r} is not one of {REAL_LABELS}")
    mesh_ok, positive, keep = _REAL_LABELS[label]
    out = []
    for r in reports:
        if not mesh_ok(r.mesh) or not r.impression or "XXXX" in r.text:
            continue
        if label == "normal" and not _is_plain_normal(r.text):
            continue
        if label == "pneumonia" and (not _is_clean(r.text) or _states(r.text, _NOT_PNEUMONIA)):
            continue
        if positive is not None:
            hit = [s for s in sentences(r.impression) if positive.search(s)]
            if not hit or any(_NEGATED.search(s) and not re.search(r"metasta", s, re.I) for s in hit):
                continue
        text = _fit(r, keep)
        if text and (label != "normal" or r.findings):
            out.append((r, text))
    return out


# --------------------------------------------------------------------------- sentence bank (DRRs)

@dataclass(frozen=True)
class SentenceBank:
    """Real IU sentences by use. positive[(kind, where)]: sentences stating that finding there;
    context[topic]: sentences of MeSH-normal reports about one topic (heart, lungs, pleura, bones);
    normal: whole normal reports (FINDINGS + IMPRESSION)."""

    positive: dict
    context: dict
    normal: tuple[str, ...]


_TOPICS = {
    "heart": re.compile(r"\b(heart|cardiac|cardiomediastinal|mediastin\w*|silhouette)\b", re.I),
    "lungs": re.compile(r"\b(lungs?|consolidation|airspace|air space|infiltrat\w*|opacit\w*)\b", re.I),
    "pleura": re.compile(r"\b(pleural|effusions?|pneumothora\w*)\b", re.I),
    "bones": re.compile(r"\b(osseous|bony|bones?|skelet\w*|ribs?|spine)\b", re.I),
}


def _where_of(sentence: str, kind: str) -> str | None:
    """The single lobe / side a positive sentence names, or None if zero or several places."""
    if kind == "cardiomegaly":
        return None if re.search(r"\b(right|left)\b", sentence, re.I) else ""
    if re.search(r"\b(bilateral\w*|bibasilar|bibasal|both|diffuse|multifocal)\b", sentence, re.I):
        return None
    if kind == "effusion":
        sides = {m.lower() for m in re.findall(r"\b(right|left)\b", sentence, re.I)}
        return sides.pop() if len(sides) == 1 else None
    hits = [k for k, rx in _LOBE_RE.items() if re.search(rx, sentence, re.I)]
    if len(hits) != 1:
        return None
    sides = {m.lower() for m in re.findall(r"\b(right|left)\b", sentence, re.I)}
    return hits[0] if len(sides) <= 1 else None


def _positive_kind(sentence: str) -> str | None:
    """The one finding kind a sentence states, or None (none, several, negated, hedged, other)."""
    if "XXXX" in sentence or not 2 <= n_words(sentence) <= 25:
        return None
    if _NEGATED.search(sentence) or _HEDGED_OR_COMPARED.search(sentence) or _DEVICE.search(sentence):
        return None
    kinds = [k for k, rx in _POSITIVE.items() if rx.search(sentence)]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    others = "|".join(v for k, v in _FINDING_WORDS.items() if k != kind)
    if kind == "cardiomegaly" and _NOT_CARDIOMEGALY.search(sentence):
        return None
    if re.search(rf"\b({others})\b", sentence, re.I):
        return None
    if kind == "nodule":
        # the renderer's smallest nodule is 1.4 cm (smaller ones vanish at 128 px)
        cm = _size_cm(sentence)
        if re.search(r"calcif|granulom|nodules", sentence, re.I) or (cm is not None and cm < 1.2):
            return None
    elif _size_cm(sentence) is not None:
        return None  # a measured opacity is a nodule, not airspace disease
    # one lung region only ("right middle lobe and lower lobe pneumonia" names two)
    if len(re.findall(r"\b(upper|middle|lower) lobes?\b|lingula\w*|\bbas(?:e|es|ilar|al)\b|\b\w*hilar\b", sentence, re.I)) > 1:
        return None
    return kind


def _context_topic(sentence: str) -> str | None:
    if "XXXX" in sentence or not 3 <= n_words(sentence) <= 20 or _HEDGED_OR_COMPARED.search(sentence):
        return None
    if _INCIDENTAL.search(sentence) or _DEVICE.search(sentence):
        return None
    hit = [t for t, rx in _TOPICS.items() if rx.search(sentence)]
    return hit[0] if len(hit) == 1 else None


@functools.lru_cache(maxsize=4)
def sentence_bank(reports: tuple[Report, ...], exclude: frozenset = frozenset(),
                  exclude_texts: frozenset = frozenset()) -> SentenceBank:
    """Index the real sentences. Reports whose uid is in `exclude` (those given to real images) are
    left out entirely, and so are whole normal reports whose text is in `exclude_texts` (another
    report can have the same words), so a memorized prompt never reappears as a DRR prompt."""
    positive: dict = {}
    context: dict = {t: set() for t in _TOPICS}
    normal = set()
    for r in reports:
        if r.uid in exclude:
            continue
        if r.mesh == ("normal",):
            for s in sentences(r.findings):
                topic = _context_topic(s)
                if topic:
                    context[topic].add(s)
            if r.findings and _is_plain_normal(r.text):
                text = _fit(r, None)
                if text and n_words(text) >= 8 and text not in exclude_texts:
                    normal.add(text)
        for s in sentences(r.findings) + sentences(r.impression):
            kind = _positive_kind(s)
            if kind is None:
                continue
            where = _where_of(s, kind)
            if where is not None:
                positive.setdefault((kind, where), set()).add(s)
    return SentenceBank(
        positive={k: tuple(sorted(v)) for k, v in sorted(positive.items())},
        context={k: tuple(sorted(v)) for k, v in context.items()},
        normal=tuple(sorted(normal)),
    )


def _severity(sentence: str, kind: str, rng: np.random.Generator) -> float:
    if kind == "nodule":
        cm = _size_cm(sentence)
        if cm is not None:
            # drr radius = 7 + 9 s mm -> diameter 1.4 .. 3.2 cm
            return float(np.clip((cm * 10.0 / 2.0 - 7.0) / 9.0, 0.0, 1.0))
    for rx, (lo, hi) in _SEVERITY:
        if rx.search(sentence):
            return float(rng.uniform(lo, hi))
    return float(rng.uniform(0.3, 0.85))


def _template(kind: str, where: str, rng: np.random.Generator) -> tuple[str, float]:
    s = float(rng.uniform(0.2, 0.9))
    size = "small" if s < 0.4 else "moderate" if s < 0.7 else "large"
    if kind == "cardiomegaly":
        size = "mildly" if s < 0.4 else "moderately" if s < 0.7 else "markedly"
        adj = {"mildly": "Mild", "moderately": "Moderate", "markedly": "Marked"}[size]
    else:
        adj = size.capitalize()
    lobe = LOBE_NAMES.get(where, "")
    cm = f"{1.4 + 1.8 * s:.1f}"
    t = TEMPLATES[kind][int(rng.integers(len(TEMPLATES[kind])))]
    text = t.format(lobe=lobe, Lobe=lobe.capitalize(), side=where, size=size, Size=adj, cm=cm)
    return text, s


def drr_prompt(kind: str, where: str, bank: SentenceBank, rng: np.random.Generator) -> tuple[str, Finding, bool]:
    """Prompt and matching finding for a DRR of `kind` at `where`.

    Returns (prompt, finding, real): real is True when every sentence is real IU text, False when
    the finding sentence is a template (no real sentence passed the filters).
    """
    if kind == "normal":
        return bank.normal[int(rng.integers(len(bank.normal)))], Finding("normal"), True
    pool = bank.positive.get((kind, where), ())
    if pool:
        sent = pool[int(rng.integers(len(pool)))]
        severity, real = _severity(sent, kind, rng), True
    else:
        sent, severity = _template(kind, where, rng)
        real = False
    # real context sentences about the structures this finding leaves alone, in findings order
    slot = {"cardiomegaly": "heart", "consolidation": "lungs", "nodule": "lungs", "effusion": "pleura"}[kind]
    allowed = {"cardiomegaly": ("lungs", "pleura", "bones"), "consolidation": ("heart", "pleura", "bones"),
               "nodule": ("heart", "pleura", "bones"), "effusion": ("heart", "bones")}[kind]
    parts = []
    for topic in ("heart", "lungs", "pleura", "bones"):
        if topic == slot:
            parts.append(sent)
        elif topic in allowed and bank.context[topic] and rng.random() < 0.6:
            parts.append(bank.context[topic][int(rng.integers(len(bank.context[topic])))])
    while n_words(" ".join(parts)) > MAX_WORDS:
        parts.remove(next(p for p in reversed(parts) if p != sent))
    return " ".join(parts), Finding(kind, where, severity), real
