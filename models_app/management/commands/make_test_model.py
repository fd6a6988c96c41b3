from pathlib import Path

from django.core.management.base import BaseCommand

from models_app.testmodel import write_tiny_model


class Command(BaseCommand):
    help = (
        "Write a tiny valid llama GGUF (2 layers, random weights, ~0.5 MB) that llama-server loads at once."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path)
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, path: Path, seed: int, **options):
        written = write_tiny_model(path, seed=seed)
        self.stdout.write(f"wrote {written} ({written.stat().st_size} bytes)")
