"""Human-readable certificates: reports/<model>/index.html and reports/index.html (see html.py)."""
from .html import page_context, render_index, render_model_page, scan, write_pages

__all__ = ["page_context", "render_index", "render_model_page", "scan", "write_pages"]
