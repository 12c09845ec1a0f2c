"""The built-in models, registered in this one place. Each is a package of its own (its
model, losses, plug-in and released-checkpoint adapter); the toolkit finds them by name
through `hat.plugins`."""
from hat.models.hat.plugin import HATPlugin
from hat.models.multisea.plugin import MultiSEAPlugin
from hat.plugins import register

register(HATPlugin)
register(MultiSEAPlugin)
