"""Option names that changed: the old spelling still works where a published command
used it, but --help shows only the new one."""

import click


def respelled(args, renamed):
    """`args` with each old option name ({old: new}), alone or as `--old=value`, in its
    new spelling; nothing after `--` (which ends the options) changes."""
    out = []
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        name, equals, value = arg.partition("=")
        out.append(renamed[name] + equals + value if name in renamed else arg)
    return out


def command_with_old_spellings(renamed):
    """A click.Command class that reads the old option names in `renamed` as the new ones."""
    class Command(click.Command):
        def parse_args(self, ctx, args):
            return super().parse_args(ctx, respelled(args, renamed))

    return Command
