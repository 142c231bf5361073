"""Example (b): a character-level language model, federated with one text per client.

A user dataset (map-style: ``__len__``, ``__getitem__(i) -> (input, target)``) of windows of
``seq_len`` characters as int64 ids, with the next characters as per-token targets, and a
``partition_keys`` attribute naming each window's text, so that ``partition.scheme: by_key``
gives every client one text. The texts are six of Shakespeare's sonnets (public domain),
written here, so the example needs no download. The built-in ``cross_entropy`` loss takes the
model's (B, T, V) logits against (B, T) ids: a sample's loss is its mean over tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn

SONNETS = {
    1: """From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory:
But thou, contracted to thine own bright eyes,
Feed'st thy light's flame with self-substantial fuel,
Making a famine where abundance lies,
Thyself thy foe, to thy sweet self too cruel:
Thou that art now the world's fresh ornament,
And only herald to the gaudy spring,
Within thine own bud buriest thy content,
And, tender churl, mak'st waste in niggarding:
Pity the world, or else this glutton be,
To eat the world's due, by the grave and thee.""",
    18: """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.""",
    29: """When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featur'd like him, like him with friends possess'd,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remember'd such wealth brings
That then I scorn to change my state with kings.""",
    73: """That time of year thou mayst in me behold
When yellow leaves, or none, or few, do hang
Upon those boughs which shake against the cold,
Bare ruin'd choirs, where late the sweet birds sang.
In me thou see'st the twilight of such day
As after sunset fadeth in the west,
Which by and by black night doth take away,
Death's second self, that seals up all in rest.
In me thou see'st the glowing of such fire
That on the ashes of his youth doth lie,
As the death-bed whereon it must expire,
Consum'd with that which it was nourish'd by.
This thou perceiv'st, which makes thy love more strong,
To love that well which thou must leave ere long.""",
    116: """Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove.
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wand'ring bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me prov'd,
I never writ, nor no man ever lov'd.""",
    130: """My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damask'd, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks.
I love to hear her speak, yet well I know
That music hath a far more pleasing sound;
I grant I never saw a goddess go;
My mistress, when she walks, treads on the ground:
And yet, by heaven, I think my love as rare
As any she belied with false compare.""",
}
VOCAB = sorted(set("".join(SONNETS.values())))  # the characters, in a fixed order


class CharWindows(torch.utils.data.Dataset):
    """Windows of ``seq_len + 1`` characters of each text, every ``stride`` characters: input
    the first ``seq_len`` ids, target the last ``seq_len`` (the next character at each position).
    ``partition_keys``: the text of each window. Defined at module level, so that DataLoader
    workers (``data.storage: stream``) can unpickle it."""

    def __init__(self, texts: list[str], seq_len: int, stride: int):
        index = {ch: i for i, ch in enumerate(VOCAB)}
        self.ids = [torch.tensor([index[ch] for ch in text], dtype=torch.long) for text in texts]
        self.seq_len = seq_len
        self.windows = [(t, s) for t, ids in enumerate(self.ids) for s in range(0, len(ids) - seq_len, stride)]
        self.partition_keys = [t for t, _ in self.windows]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = self.windows[i]
        w = self.ids[t][s:s + self.seq_len + 1]
        return w[:-1], w[1:]


def sonnets(seq_len: int = 32, stride: int = 4, test_fraction: float = 0.2) -> tuple[CharWindows, CharWindows]:
    """The data factory (``data.source: examples.char_lm:sonnets``): each text's first part
    trains, its last ``test_fraction`` tests (no window crosses the cut)."""
    cuts = [int(len(t) * (1 - test_fraction)) for t in SONNETS.values()]
    train = CharWindows([t[:c] for t, c in zip(SONNETS.values(), cuts)], seq_len, stride)
    test = CharWindows([t[c:] for t, c in zip(SONNETS.values(), cuts)], seq_len, stride)
    return train, test


class CharLSTM(nn.Module):
    """Embedding -> one-layer LSTM -> linear: (B, T) ids to (B, T, V) next-character logits."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.out(h)


def char_lstm(embed: int = 32, hidden: int = 128) -> CharLSTM:
    """The model factory (``model.name: examples.char_lm:char_lstm``)."""
    return CharLSTM(len(VOCAB), embed, hidden)
