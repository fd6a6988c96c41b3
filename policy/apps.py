from django.apps import AppConfig


class PolicyConfig(AppConfig):
    name = "policy"
    label = "policy"
    verbose_name = "Team policy"
