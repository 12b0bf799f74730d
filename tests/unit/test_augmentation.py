"""Which variants of a passage the augment stage keeps, and why it drops the others."""

from potential_meme.engine.augmentation import filter_variants, first_round, passages, second_round
from potential_meme.engine.data import Document
from potential_meme.engine.responses import prompt_id

SOURCE = Document(
    "json",
    "The json module encodes Python objects as JSON text and decodes JSON text back into Python objects, "
    "following the standard closely.",
)


def test_documents_are_cut_into_passages_at_blank_lines():
    document = Document("os", "one two\n\nthree four five\n\n\n\nsix\n\n" + "long " * 40)
    cut = passages([document], size=20)
    assert [d.text for d in cut] == ["one two", "three four five\n\nsix", ("long " * 40).strip()]
    assert {d.group for d in cut} == {"os"}  # a variant of a passage stays in its document's split group


def test_back_translation_is_asked_only_for_translations_that_came_back():
    asked = first_round([SOURCE], ["paraphrase", "back_translation"], 2, "German")
    key = prompt_id(SOURCE.text)
    assert [p.id for p in asked] == [f"{key}-paraphrase-0", f"{key}-pivot-0", f"{key}-paraphrase-1", f"{key}-pivot-1"]
    assert "into German" in asked[1].text and SOURCE.text in asked[1].text
    back = second_round([SOURCE], {f"{key}-pivot-0": "Das json-Modul ...", f"{key}-pivot-1": "  "}, 2, "German")
    assert [p.id for p in back] == [f"{key}-back_translation-0"] and "Das json-Modul" in back[0].text


def test_variants_are_dropped_for_a_reason_and_counted_by_method():
    key = prompt_id(SOURCE.text)
    kept_one = "Python's json module turns objects into JSON strings and parses JSON strings into objects again."
    answers = {
        f"{key}-paraphrase-0": kept_one,
        f"{key}-paraphrase-1": "",  # empty
        f"{key}-paraphrase-2": "JSON.",  # too short
        f"{key}-paraphrase-3": kept_one + " " + "It is long. " * 40,  # too long
        f"{key}-paraphrase-4": SOURCE.text.upper() + "!",  # the source again, shouted
        f"{key}-back_translation-0": kept_one,  # what the paraphrase said already
        f"{key}-back_translation-1": kept_one.replace("again", "once more"),  # nearly what it said
        f"{key}-back_translation-2": "With json, Python data becomes JSON text, and JSON text becomes Python data.",
    }
    result = filter_variants([SOURCE], answers, ["paraphrase", "back_translation"], 5, (0.5, 2.0), 0.6)
    assert [d.text for d in result.kept] == [kept_one, answers[f"{key}-back_translation-2"]]
    assert all(d.group == "json" for d in result.kept)
    assert result.report() == {
        "back_translation": {"written": 3, "kept": 1, "dropped": {"duplicate": 1, "near_duplicate": 1}},
        "paraphrase": {
            "written": 5,
            "kept": 1,
            "dropped": {"copy_of_source": 1, "empty": 1, "too_long": 1, "too_short": 1},
        },
    }
