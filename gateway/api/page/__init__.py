"""The fleet page at /corral/.

    serve.py     the routes: the page's files, read once from the package, with a strict CSP
    static/      index.html, page.css, page.js (package data, shipped in the wheel): polls
                 /api/corral/status with the admin key as an Authorization header
"""
