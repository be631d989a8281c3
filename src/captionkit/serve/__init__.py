"""`captionkit serve`: one HTTP server for captions and segmentation, with a web page.

`create_app(captioner, options)` builds the FastAPI application around an already loaded model;
`run(options)` loads the models `options` names and serves them with uvicorn. Importing this
package stays light: FastAPI loads when one of those two is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from captionkit.serve.options import ServeOptions

if TYPE_CHECKING:
    from captionkit.serve.app import create_app, run

__all__ = ["ServeOptions", "create_app", "run"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "run"):
        from captionkit.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'captionkit.serve' has no attribute {name!r}")
