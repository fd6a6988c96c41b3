"""The registry's form: one set of rules for a model entry wherever a person types one (the admin, the web's
"Add a model" page): the path inside the model folders (its GGUF facts and size read from the file), the flags
known to the llama-server(s) the entry runs on and allowed."""

from django import forms

from .models import LlamaBinary, ModelConfig
from .registry import RegistryError, check_cli_params, model_file


class ModelConfigForm(forms.ModelForm):
    """The registry's rules, as in the API and the YAML import: the path inside the model folders, the
    flags known to the llama-server(s) the entry runs on and allowed."""

    class Meta:
        model = ModelConfig
        fields = [
            "id",
            "name",
            "path",
            "binary",
            "cli_params",
            "metadata",
            "restart_on_crash",
            "max_restarts",
            "on_demand",
            "keep_alive_seconds",
            "allow_anonymous",
            "exclusive",
        ]
        labels = {"cli_params": "Command-line flags", "binary": "llama-server binary"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "binary" in self.fields:
            self.fields["binary"].queryset = LlamaBinary.objects.filter(error="").select_related("host")

    def clean_path(self):
        # The registry's one way to take a path (API and import too): relative paths inside the model
        # folders, and the GGUF facts and size read from the file, saved with it.
        try:
            self.file_values = model_file(self.cleaned_data["path"])
        except RegistryError as exc:
            raise forms.ValidationError(str(exc)) from None
        return self.file_values["path"]

    def save(self, commit=True):
        entry = super().save(commit=False)
        if getattr(self, "file_values", None):
            entry.gguf_metadata = self.file_values["gguf_metadata"]
            entry.file_size_bytes = self.file_values["file_size_bytes"]
        if commit:
            entry.save()
            self.save_m2m()
        return entry

    def clean(self):
        cleaned = super().clean()
        if "cli_params" in cleaned and not self.has_error("path"):
            try:
                check_cli_params(
                    cleaned["cli_params"], binary=cleaned.get("binary"), model_path=cleaned.get("path")
                )
            except RegistryError as exc:
                self.add_error("cli_params", str(exc))
        return cleaned
