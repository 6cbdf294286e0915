"""Incremental decoding and stop strings, with the embedded model's real tokenizer."""

import pytest
from transformers import AutoTokenizer

from deployments.model_source import embedded_model_folder
from deployments.text_output import IncrementalDecoder, SequenceText, StopStringFilter
from deployments.transformers_engine import prepare_embedded_model


@pytest.fixture(scope="module")
def tokenizer():
    prepare_embedded_model()
    return AutoTokenizer.from_pretrained(embedded_model_folder())


def decode_with(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you?",
        "Ünïcödé: café, naïve, 日本語のテキスト, emoji 🙂🚀 and Ελληνικά.",
        "  leading spaces\tand\nnewlines  ",
    ],
)
def test_deltas_join_to_the_full_decode_without_broken_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(decode_with(tokenizer))
    deltas = [decoder.append(token) for token in ids]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in delta for delta in deltas)


def test_multibyte_character_split_over_tokens_waits_for_completion(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    decoder = IncrementalDecoder(decode_with(tokenizer))
    deltas = [decoder.append(token) for token in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🙂"


def feed_all(stop, pieces):
    text_filter = StopStringFilter(stop)
    released = [text_filter.feed(piece) for piece in pieces]
    return released, text_filter


def test_stop_string_cuts_and_is_not_returned():
    released, text_filter = feed_all(["END"], ["Hello ", "wor", "ld E", "N", "D more"])
    assert "".join(released) == "Hello world "
    assert text_filter.stopped


def test_stop_string_spanning_pieces_is_held_back_until_decided():
    released, text_filter = feed_all(["\n\n"], ["a\n", "b"])
    assert released == ["a", "\nb"]
    assert not text_filter.stopped


def test_partial_stop_is_released_at_flush():
    released, text_filter = feed_all(["STOP"], ["go ST"])
    assert released == ["go "]
    assert text_filter.flush() == "ST"


def test_earliest_of_several_stops_wins():
    released, text_filter = feed_all(["zz", "b"], ["a b zz"])
    assert released == ["a "] and text_filter.stopped


def test_no_stop_releases_everything_at_once():
    released, _ = feed_all([], ["abc", "def"])
    assert released == ["abc", "def"]


def test_sequence_text_stops_on_decoded_text(tokenizer):
    ids = tokenizer(" one two three four", add_special_tokens=False)["input_ids"]
    text = SequenceText(decode_with(tokenizer), stop=(" three",))
    out = ""
    for token in ids:
        out += text.append(token)
        if text.stopped:
            break
    assert out == " one two"
