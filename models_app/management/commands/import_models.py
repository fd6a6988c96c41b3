from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from models_app.importer import ImportRejected, import_registry


class Command(BaseCommand):
    help = "Create or update registry entries from the original LlamaController's models YAML file."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--dry-run", action="store_true", help="Check and report; write nothing.")

    def handle(self, file: Path, dry_run: bool, **options):
        try:
            report = import_registry(file, dry_run=dry_run)
        except ImportRejected as exc:
            lines = "\n".join(f"  - {problem}" for problem in exc.problems)
            raise CommandError(
                f"{file}: nothing imported, {len(exc.problems)} problem(s):\n{lines}"
            ) from None
        prefix = "would be " if dry_run else ""
        for model_id in report.created:
            self.stdout.write(f"{prefix}created  {model_id}")
        for model_id, fields in report.updated.items():
            self.stdout.write(f"{prefix}updated  {model_id}: {', '.join(fields)}")
        for model_id in report.unchanged:
            self.stdout.write(f"unchanged {model_id}")
        self.stdout.write(
            f"{len(report.created)} created, {len(report.updated)} updated, {len(report.unchanged)} unchanged"
        )
