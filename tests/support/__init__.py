"""What the tests share: the checkout's root, real servers, the packaged Bento, fakes for fault paths."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
