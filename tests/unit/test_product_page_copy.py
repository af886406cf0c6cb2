"""docs/PRODUCT_PAGE.txt is the product page, and its code blocks are found as written.

tests/integration/test_product_page.py runs the blocks of the repo's copy (a clean
clone has no ../shared); this keeps the copy equal to ../shared/PRODUCT_PAGE.txt
wherever that exists, and checks the parser of tests/examples.py on small pages.
"""

from __future__ import annotations

import pytest
from tests.examples import PRODUCT_PAGE, SHARED_PRODUCT_PAGE, page_blocks


@pytest.mark.skipif(not SHARED_PRODUCT_PAGE.is_file(), reason="no ../shared/PRODUCT_PAGE.txt")
def test_repo_copy_is_the_shared_page() -> None:
    assert PRODUCT_PAGE.read_bytes() == SHARED_PRODUCT_PAGE.read_bytes(), (
        f"cp {SHARED_PRODUCT_PAGE} {PRODUCT_PAGE}"
    )


def test_blocks_and_their_titles() -> None:
    page = (
        "Quickstart\n"
        "from bastion import Bastion\n"
        "bastion = Bastion(\n"
        'base_url="bastion_url",\n'
        ")\n"
        "Possible states:\n"
        "createdrunningstoppeddeleted\n"
        "Stop a Session\n"
        "bastion.sessions.stop(session_id)\n"
        "pip install bastion-py-sdk\n"
        "- Raises\n"
        "Don't stop here\n"
    )
    blocks = page_blocks(page)
    assert [(b.title, b.line) for b in blocks] == [("Quickstart", 2), ("Stop a Session", 9)]
    assert blocks[0].source == (
        'from bastion import Bastion\nbastion = Bastion(\nbase_url="bastion_url",\n)\n'
    )
    assert blocks[1].source == "bastion.sessions.stop(session_id)\n"


def test_lost_indentation_is_restored() -> None:
    page = (
        "Example\n"
        "try:\n"
        'bastion.sessions.start("invalid-id")\n'
        "except SessionError as e:\n"
        "print(e)\n"
        "def on_update(update):\n"
        'print(update["status"])\n'
        "bastion.jobs.watch(session_id, job_id, on_update)\n"
    )
    (block,) = page_blocks(page)
    assert block.source == (
        "try:\n"
        '    bastion.sessions.start("invalid-id")\n'
        "except SessionError as e:\n"
        "    print(e)\n"
        "def on_update(update):\n"
        '    print(update["status"])\n'
        "bastion.jobs.watch(session_id, job_id, on_update)\n"
    )
    assert not block.is_format


def test_a_dict_literal_is_a_format() -> None:
    (block,) = page_blocks('Terminal Message Format\n{\n"type": "init" | "term_output",\n}\n')
    assert block.is_format and block.title == "Terminal Message Format"


def test_the_page_has_its_examples() -> None:
    titles = [b.title for b in page_blocks(PRODUCT_PAGE.read_text()) if not b.is_format]
    assert titles[0] == "Quickstart" and titles[-1] == "Complete Example"
    assert "Or use a context manager:" in titles and len(titles) >= 20
