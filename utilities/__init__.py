"""Small helpers shared by every app (NetBox keeps its own in utilities/ too). They import no app of ours, so any
app may use them without an arrow pointing back: query.py (checks of query parameters and form fields),
periodic.py (beat tasks that act once per period), dbutil.py (bulk row updates)."""
