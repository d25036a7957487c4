"""The web app that `herd serve` serves at ``/`` on its own port (see docs/web.md).

    routes.py         mount_web(app, settings): index.html, /static/*, security headers, wiring
    session.py        API key login -> session cookie; session_auth() and check_csrf() for the auth middleware
    conversations.py  /v1/conversations: the chat sidebar, over `herd chat`'s own SQLite stores
    jobs.py           /v1/jobs: `herd tune` and `herd eval` as child processes, with live progress
    static/           the built front end (web/ at the repository root is its source; `npm run build`)
"""

from .routes import mount_web
from .session import check_csrf, is_public_path, session_auth

__all__ = ["check_csrf", "is_public_path", "mount_web", "session_auth"]
