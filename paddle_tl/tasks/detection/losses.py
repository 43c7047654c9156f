"""The box regression loss shared by the RPN and the box head."""

from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def smooth_l1(input, target, beta=1.0 / 9):
    """Summed smooth L1 (Fast R-CNN; torchvision's beta = 1/9 for both
    heads): 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta. Written out
    because paddle's smooth_l1_loss `delta` is the Huber loss (delta |x| -
    0.5 delta^2), which differs by a factor of beta."""
    diff = paddle.abs(input - target)
    return paddle.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()
