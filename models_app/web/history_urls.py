from django.urls import path

from . import history

urlpatterns = [
    path("gpus/<int:pk>/history/", history.gpu_history, name="gpu-history-page"),
    path("instances/<int:pk>/history/", history.instance_history, name="instance-history-page"),
    path("alerts/", history.alert_list, name="alerts"),
    path("alerts/<int:pk>/acknowledge/", history.acknowledge, name="alert-acknowledge"),
]
