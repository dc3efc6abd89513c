"""The application wing: the digits demo, the HTML/CSV reports, the loaders of saved models and data files, and the
plots (matplotlib stays lazy: import :mod:`influenciae.app.plots` to use it).

* :mod:`influenciae.app.demo`: the end-to-end digits demo of ``influenciae demo``.
* :mod:`influenciae.app.report`: the CSV files and HTML reports of the console script.
* :mod:`influenciae.app.io`: saved models, losses by name and training data (``.npz``, TFRecord, tfds) for the CLI.
* :mod:`influenciae.app.plots`: matplotlib figures of scores, images and curves.
"""
