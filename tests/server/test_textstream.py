"""Incremental UTF-8 decoding and stop strings held back until decided."""

from __future__ import annotations

from server.textstream import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces]


def test_plain_text_passes_through_piece_by_piece() -> None:
    s = TextStream()
    assert feed(s, [b"def ", b"f(", b"):"]) == ["def ", "f(", "):"]
    assert s.flush() == ""


def test_a_character_split_across_tokens_is_sent_whole() -> None:
    s = TextStream()
    snake = "🐍".encode()
    assert feed(s, [b"a" + snake[:2], snake[2:] + b"b"]) == ["a", "🐍b"]


def test_an_incomplete_character_at_the_end_becomes_a_replacement_character() -> None:
    s = TextStream()
    assert s.push("é".encode()[:1]) == ""
    assert s.flush() == "\ufffd"


def test_stop_string_inside_one_piece_cuts_the_text() -> None:
    s = TextStream(["\n\n"])
    assert s.push(b"return x\n\nprint") == "return x"
    assert s.stopped
    assert s.push(b"more") == "" and s.flush() == ""


def test_stop_string_across_pieces_is_held_back_then_dropped() -> None:
    s = TextStream(["</end>"])
    assert feed(s, [b"ab</", b"en", b"d>tail"]) == ["ab", "", ""]
    assert s.stopped


def test_held_text_that_turns_out_not_to_be_a_stop_is_released() -> None:
    s = TextStream(["</end>"])
    assert feed(s, [b"x</e", b"x"]) == ["x", "</ex"]
    assert not s.stopped


def test_held_text_is_released_at_the_end() -> None:
    s = TextStream(["STOP"])
    assert s.push(b"abcST") == "abc"
    assert s.flush() == "ST"


def test_earliest_of_several_stops_wins() -> None:
    s = TextStream(["bb", "a"])
    assert s.push(b"xxbbya") == "xx"


def test_positions_count_characters_decoded_and_sent() -> None:
    s = TextStream(["</end>"])
    snake = "🐍".encode()
    s.push(b"ab" + snake[:2])
    assert (s.decoded, s.released) == (2, 2)  # half a character is not a character yet
    s.push(snake[2:] + b"</")
    assert (s.decoded, s.released) == (5, 3)  # "</" held: it may begin the stop string
    s.push(b"en")
    s.push(b"d>tail")
    assert s.stopped and s.released == 3  # the text ends where the stop string began
    t = TextStream()
    t.push("é".encode()[:1])
    assert t.flush() == "\ufffd" and (t.decoded, t.released) == (1, 1)
