"""Optimizers that update a model's parameter dicts in place.

``step()`` reads ``model.grads`` (filled by ``model.backward``) and writes the
new values into the same arrays the layers hold.
"""


class SGD:
    """SGD with momentum and L2 weight decay.

    v <- momentum * v - lr * (g + weight_decay * w);   w <- w + v
    """

    def __init__(self, model, lr=0.01, momentum=0.9, weight_decay=0.0):
        self.model, self.lr, self.momentum, self.weight_decay = model, lr, momentum, weight_decay
        self.velocity = {}

    def step(self):
        grads = self.model.grads
        for name, w in self.model.params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * w
            v = self.velocity.get(name)
            if v is None:
                v = self.velocity[name] = w * 0
            v *= self.momentum
            v -= self.lr * g
            w += v                                   # in place: the layer holds this array


class Adam:
    """Adam (Kingma and Ba, 2015) with bias correction and optional L2 weight decay."""

    def __init__(self, model, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.model, self.lr, self.beta1, self.beta2, self.eps = model, lr, beta1, beta2, eps
        self.weight_decay, self.t, self.m, self.v = weight_decay, 0, {}, {}

    def step(self):
        self.t += 1
        grads = self.model.grads
        correction1 = 1 - self.beta1 ** self.t
        correction2 = 1 - self.beta2 ** self.t
        for name, w in self.model.params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * w
            if name not in self.m:
                self.m[name], self.v[name] = w * 0, w * 0
            m, v = self.m[name], self.v[name]
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            w -= self.lr * (m / correction1) / ((v / correction2) ** 0.5 + self.eps)
