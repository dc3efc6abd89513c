"""TCAV significance on sklearn digits: the paper's shared-counterpart null against the cyclic null (docs/concepts.md).

Run: ``.venv/bin/python benchmarks/concepts_significance.py``; prints one line per (draw, null, concept, layer).
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

from influenciae.concepts import TCAV, Concept, random_concepts

keras.utils.set_random_seed(0)
X, y = load_digits(return_X_y=True)
X = X / 16.0
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
X, y = X[order], y[order]
xtr, ytr, xc, yc = X[:1000], y[:1000], X[1000:], y[1000:]
inp = keras.Input((64,))
h1 = keras.layers.Dense(32, activation="relu", name="h1")(inp)
h2 = keras.layers.Dense(16, activation="relu", name="h2")(h1)
out = keras.layers.Dense(10, name="logits")(h2)
model = keras.Model(inp, out)
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(xtr, ytr, epochs=60, batch_size=100, verbose=0)
print("test acc", (model.predict(xc, verbose=0).argmax(1) == yc).mean())
pool = xc[:400]
eights = Concept("eights", xc[400:][yc[400:] == 8][:40])
ones = Concept("ones", xc[400:][yc[400:] == 1][:40])
class8 = xtr[ytr == 8][:60]
for seed in (1, 2):
    randoms = random_concepts(pool, 11, 40, seed=seed, prefix=f"r{seed}")
    tcav = TCAV(model, ["h1", "h2"])
    for null in ("counterpart", "cyclic"):
        for c in (eights, ones):
            r = tcav.significance(class8, 8, c, randoms, null=null)
            for layer in ("h1", "h2"):
                print(
                    seed,
                    null,
                    c.name,
                    layer,
                    "concept {:.3f} random {:.3f} p={:.2g}".format(
                        r[layer]["concept_mean"], r[layer]["random_mean"], r[layer]["p_value"]
                    ),
                )
