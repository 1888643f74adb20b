"""The run report a person reads (report.html, report.md) and its figures."""

from factory.report.render import write_report

__all__ = ["write_report"]
