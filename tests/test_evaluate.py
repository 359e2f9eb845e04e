"""Answer extraction must match the official run.py: text after the last '#', commas removed, stripped."""

from mlx_coconut.evaluate import extract_answer, extract_cot, reference_answer


def test_extract_answer_takes_text_after_last_hash():
    assert extract_answer("Q?\n<<2*3=6>>\n### 6") == "6"
    assert extract_answer("Q?\n<<2*3=6>>\n### 6\n") == "6"
    # multiple '#': only the text after the LAST one counts
    assert extract_answer("a # b ### 12 # 13") == "13"
    assert extract_answer("### 12 #") == ""


def test_extract_answer_removes_commas_and_strips():
    assert extract_answer("### 1,000") == "1000"
    assert extract_answer("###   1,234,567  \n") == "1234567"
    assert extract_answer("### 3,5") == "35"  # official: every comma goes, not just separators


def test_extract_answer_without_hash_is_the_whole_text():
    assert extract_answer("  the answer is 7 ") == "the answer is 7"
    assert extract_answer("") == ""


def test_reference_answer_and_cot():
    assert reference_answer(" 1,000 ") == "1000"
    text = "How many?\n<<2*3=6>>\n<<6+1=7>>\n### 7"
    assert extract_cot(text) == "<<2*3=6>>\n<<6+1=7>>"
    assert extract_answer(text) == reference_answer("7")
