"""Free-text prompts → canonical organ names.

Users type what they would say to a colleague ("L kidney", "hepatic", "IVC and aorta",
"all organs"); the model and the label maps speak canonical TotalSegmentator-style names
("kidney_left", "liver", ...).  This module is the only place that translation happens.
"""

from __future__ import annotations

import difflib
import re

# Canonical organ name → phrases that mean it (besides the name itself with spaces).
# Ordered as users expect to see them listed (roughly top to bottom of the abdomen).
ORGAN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "liver": ("hepatic", "hepar"),
    "spleen": ("splenic", "lien"),
    "kidney_left": ("left kidney", "l kidney", "kidney l", "lt kidney", "left renal", "renal left"),
    "kidney_right": ("right kidney", "r kidney", "kidney r", "rt kidney", "right renal", "renal right"),
    "gallbladder": ("gall bladder", "gb", "cholecyst"),
    "stomach": ("gastric",),
    "pancreas": ("pancreatic",),
    "adrenal_gland_left": ("left adrenal", "left adrenal gland", "l adrenal", "adrenal left", "left suprarenal"),
    "adrenal_gland_right": (
        "right adrenal",
        "right adrenal gland",
        "r adrenal",
        "adrenal right",
        "right suprarenal",
    ),
    "aorta": ("aortic", "abdominal aorta"),
    "inferior_vena_cava": ("ivc", "vena cava", "inferior cava", "vena cava inferior"),
    "portal_vein_and_splenic_vein": (
        "portal vein",
        "splenic vein",
        "portal and splenic vein",
        "portal splenic vein",
        "portal",
    ),
    "duodenum": ("duodenal",),
    "colon": ("large bowel", "large intestine", "colonic"),
    "small_bowel": ("small intestine", "intestine small", "bowel small", "ileum", "jejunum"),
    "urinary_bladder": ("bladder", "urinary bladder", "vesica"),
    "vertebrae": ("vertebra", "spine", "vertebral column", "vertebral body", "vertebral bodies", "spinal column"),
}

KNOWN_ORGANS: tuple[str, ...] = tuple(ORGAN_SYNONYMS)

ALL_ORGANS_PHRASES = ("all organs", "all", "everything", "all structures", "every organ", "organs")

# Words that carry no meaning for the choice of organ ("segment the liver please").
_FILLER_WORDS = {"segment", "the", "please", "a", "an", "of", "show", "me", "mask", "label", "organ", "find"}


class UnknownPromptError(ValueError):
    """A prompt names no organ this model knows; carries what *is* known and the nearest guesses."""

    def __init__(self, prompt: str, part: str, suggestions: list[str], known: tuple[str, ...] = KNOWN_ORGANS):
        self.prompt = prompt
        self.part = part
        self.suggestions = suggestions
        self.known_organs = list(known)
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"Unknown organ {part!r} in prompt {prompt!r}.{hint} "
            f"Known organs: {', '.join(known)} (or 'all organs')."
        )


def _normalise(text: str) -> str:
    """Lower case, punctuation and underscores to spaces, filler words dropped, spaces folded."""
    text = re.sub(r"[_\-/.;:!?()\"']", " ", text.lower())
    words = [w for w in text.split() if w not in _FILLER_WORDS]
    return " ".join(words)


def _key(text: str) -> str:
    """Order-insensitive key, so "kidney left" and "left kidney" meet."""
    return " ".join(sorted(text.split()))


def _build_lookup() -> dict[str, str]:
    lookup: dict[str, str] = {}
    for organ, synonyms in ORGAN_SYNONYMS.items():
        for phrase in (organ, *synonyms):
            lookup[_key(_normalise(phrase))] = organ
    return lookup


_LOOKUP = _build_lookup()


def _split(prompt: str) -> list[str]:
    """Split a list prompt on commas, semicolons, '+', '&' and the word 'and'.

    "and" inside a canonical name ("portal vein and splenic vein") must survive, so a part
    is only split on "and" when the whole part is not itself a known phrase.
    """
    parts: list[str] = []
    for chunk in re.split(r"[,;+&\n]", prompt):
        if not chunk.strip():
            continue
        if _key(_normalise(chunk)) in _LOOKUP:
            parts.append(chunk)
        else:
            parts.extend(p for p in re.split(r"\band\b", chunk, flags=re.IGNORECASE) if p.strip())
    return parts


def resolve_organ(phrase: str, prompt: str | None = None) -> str:
    """One phrase → one canonical organ name, or UnknownPromptError with suggestions."""
    normal = _normalise(phrase)
    organ = _LOOKUP.get(_key(normal))
    if organ is not None:
        return organ
    candidates = {" ".join(k.split()): v for k, v in _LOOKUP.items()}
    close = difflib.get_close_matches(_key(normal), list(candidates), n=6, cutoff=0.6)
    suggestions = list(dict.fromkeys(candidates[c] for c in close))[:3]
    raise UnknownPromptError(prompt if prompt is not None else phrase, phrase.strip(), suggestions)


def parse_prompt(prompt: str, known: tuple[str, ...] = KNOWN_ORGANS) -> list[str]:
    """Free text → ordered, de-duplicated canonical organ names.

    `known` restricts "all organs" (and the accepted names) to what a given model was trained on.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise UnknownPromptError(str(prompt), str(prompt), [], known)
    if _normalise(prompt) in ALL_ORGANS_PHRASES or prompt.strip().lower() in ALL_ORGANS_PHRASES:
        return list(known)
    organs = [resolve_organ(part, prompt) for part in _split(prompt)]
    if not organs:
        raise UnknownPromptError(prompt, prompt, [], known)
    for organ in organs:
        if organ not in known:
            related = [o for o in known if o.split("_")[0] in organ][:3]
            raise UnknownPromptError(prompt, organ, related, known)
    return list(dict.fromkeys(organs))


def organ_text(organ: str) -> str:
    """The phrase fed to the text encoder for a canonical organ ("kidney_left" → "left kidney")."""
    synonyms = ORGAN_SYNONYMS.get(organ, ())
    natural = next((s for s in synonyms if s.startswith(("left ", "right "))), None)
    return natural or organ.replace("_", " ")
