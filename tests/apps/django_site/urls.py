from django.contrib import admin
from django.http import HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.urls import path
from django.views.decorators.csrf import csrf_exempt


def form(request):
    if request.method == "POST":
        return HttpResponse(f"thanks, {request.POST.get('name', '?')}")
    return HttpResponse(f'<form method="post"><input name="csrfmiddlewaretoken" '
                        f'value="{get_token(request)}"><input name="name"></form>')


@csrf_exempt
def upload(request):
    return JsonResponse({"received": len(request.body), "remote": request.META["REMOTE_ADDR"],
                         "length": request.META.get("CONTENT_LENGTH")})


urlpatterns = [path("admin/", admin.site.urls), path("form/", form), path("upload/", upload)]
