"""The validate step: expectation suites over the metadata, and the quarantine of failing rows."""

from clipflow.validate.suite import check_passed, validate

__all__ = ["check_passed", "validate"]
