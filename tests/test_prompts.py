import pytest

from progidiff.prompts import KNOWN_ORGANS, UnknownPromptError, organ_text, parse_prompt


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("liver", ["liver"]),
        ("  LIVER ", ["liver"]),
        ("Segment the liver", ["liver"]),
        ("hepatic", ["liver"]),
        ("L kidney", ["kidney_left"]),
        ("kidney left", ["kidney_left"]),
        ("Left   Kidney", ["kidney_left"]),
        ("kidney_right", ["kidney_right"]),
        ("IVC", ["inferior_vena_cava"]),
        ("inferior vena cava", ["inferior_vena_cava"]),
        ("gall bladder", ["gallbladder"]),
        ("portal vein and splenic vein", ["portal_vein_and_splenic_vein"]),
        ("bladder", ["urinary_bladder"]),
        ("spine", ["vertebrae"]),
        ("left adrenal", ["adrenal_gland_left"]),
        ("small intestine", ["small_bowel"]),
    ],
)
def test_single_organ_phrases(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_lists_keep_order_and_drop_duplicates():
    assert parse_prompt("left kidney, spleen") == ["kidney_left", "spleen"]
    assert parse_prompt("liver and spleen and IVC") == ["liver", "spleen", "inferior_vena_cava"]
    assert parse_prompt("aorta; liver, hepatic") == ["aorta", "liver"]


def test_all_organs_means_every_known_organ():
    assert parse_prompt("all organs") == list(KNOWN_ORGANS)
    assert parse_prompt("All Organs", known=("liver", "spleen")) == ["liver", "spleen"]


def test_vocabulary_covers_the_abdomen():
    for organ in (
        "spleen kidney_left kidney_right gallbladder liver stomach pancreas adrenal_gland_left adrenal_gland_right "
        "aorta inferior_vena_cava portal_vein_and_splenic_vein duodenum colon small_bowel urinary_bladder vertebrae"
    ).split():
        assert organ in KNOWN_ORGANS


def test_unknown_prompt_lists_known_organs_and_closest_matches():
    with pytest.raises(UnknownPromptError) as info:
        parse_prompt("livr, spleen")
    error = info.value
    assert error.part == "livr"
    assert error.suggestions[0] == "liver"
    assert error.known_organs == list(KNOWN_ORGANS)
    assert "liver" in str(error) and "Known organs" in str(error)


@pytest.mark.parametrize("prompt", ["", "   ", "brain tumour", ",,,", "and"])
def test_empty_or_meaningless_prompts_are_rejected(prompt):
    with pytest.raises(UnknownPromptError):
        parse_prompt(prompt)


def test_organ_outside_the_models_vocabulary_is_rejected():
    with pytest.raises(UnknownPromptError) as info:
        parse_prompt("pancreas", known=("liver", "spleen"))
    assert info.value.known_organs == ["liver", "spleen"]


def test_organ_text_reads_naturally():
    assert organ_text("kidney_left") == "left kidney"
    assert organ_text("inferior_vena_cava") == "inferior vena cava"
