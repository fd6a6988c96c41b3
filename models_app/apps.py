from django.apps import AppConfig


class ModelsAppConfig(AppConfig):
    name = "models_app"
    verbose_name = "Models and instances"

    def ready(self):
        from accounts.audit import account_event

        from .events import record_account_event

        account_event.connect(record_account_event, dispatch_uid="models_app.record_account_event")
        # A registry change asks every live host to check the model files again (models_app/model_files.py).
        from . import model_files

        model_files.connect()
