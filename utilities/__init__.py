"""Small helpers shared by every app (NetBox keeps its own in utilities/ too): they import no app of ours, so any app
may import them without an arrow pointing back."""
