from django.urls import path

from . import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("load/", views.load, name="load"),
    path("load/estimate/", views.load_estimate, name="load-estimate"),
    path("instances/<int:pk>/unload/", views.unload, name="instance-unload"),
    path("instances/<int:pk>/switch/", views.switch, name="instance-switch"),
    path("instances/<int:pk>/log/", views.instance_log, name="instance-log"),
    path("gpus/<int:gpu_pk>/orphans/<int:pid>/kill/", views.kill_orphan, name="orphan-kill"),
    path("events/", views.events, name="events"),
]
