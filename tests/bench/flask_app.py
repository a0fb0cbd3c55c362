"""The 'realistic app' of the benchmark: a Flask view rendering a small template
(templates/catalogue.html, compiled once and cached by Flask's Jinja loader)."""
from flask import Flask, render_template

app = Flask(__name__)
ITEMS = [{"name": f"item {i}", "price": i * 3} for i in range(10)]


@app.route("/")
def index():
    return render_template("catalogue.html", title="Catalogue", items=ITEMS)
