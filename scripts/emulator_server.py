"""Runs moto's server with DynamoDB requests made atomic, like the real service.

moto 5.2.5 serves requests on many threads, and its TransactWriteItems backs up each table with a
deep copy, applies the writes one by one, and restores the copy when a condition fails. Two
concurrent transactions can therefore both pass the same condition, and a restore can wipe writes
that other threads made meanwhile: seqs get reused and acked messages vanish. Real DynamoDB
checks every condition of a transaction before applying any write, and isolates transactions
from each other and from reads.

So this launcher (used by scripts/emulator; never in production):
- serializes every DynamoDB item read and write on one lock, and
- replaces transact_write_items with check-all-then-apply, which also makes it O(items in the
  transaction) instead of O(table size) and keeps stream shard iterators valid.
"""

import functools
import sys
import threading

from moto import server
from moto.dynamodb.comparisons import get_filter_expression
from moto.dynamodb.exceptions import (
    MultipleTransactionsException,
    TooManyTransactionsException,
    TransactionCanceledException,
)
from moto.dynamodb.models import DynamoDBBackend

LOCK = threading.RLock()

ITEM_METHODS = (
    "put_item",
    "update_item",
    "delete_item",
    "get_item",
    "query",
    "scan",
    "batch_get_item",
    "transact_get_items",
)


def locked(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with LOCK:
            return method(*args, **kwargs)

    return wrapper


for name in ITEM_METHODS:
    if hasattr(DynamoDBBackend, name):
        setattr(DynamoDBBackend, name, locked(getattr(DynamoDBBackend, name)))


def transact_write_items(self, transact_items):
    if len(transact_items) > 100:
        raise TooManyTransactionsException()
    with LOCK:
        seen = set()
        errors = []
        plan = []
        for item in transact_items:
            op_type, op = next(iter(item.items()))
            table_name = op["TableName"]
            table = self.get_table(table_name)
            if op_type == "Put":
                attrs = op["Item"]
                key = {table.hash_key_attr: attrs[table.hash_key_attr]}
                if table.range_key_attr is not None:
                    key[table.range_key_attr] = attrs[table.range_key_attr]
            else:
                key = op["Key"]
            marker = (table_name, str(dict(sorted(key.items()))))
            if marker in seen:
                raise MultipleTransactionsException()
            seen.add(marker)
            condition = op.get("ConditionExpression")
            ok = True
            if condition is not None:
                current = self.get_item(table_name, key)
                expr = get_filter_expression(
                    condition,
                    op.get("ExpressionAttributeNames"),
                    op.get("ExpressionAttributeValues"),
                )
                ok = expr.expr(current)
            if ok:
                errors.append((None, None, None))
            else:
                errors.append(
                    ("ConditionalCheckFailed", "The conditional request failed", None)
                )
            plan.append((op_type, op, table_name, key))
        if any(code is not None for code, _, _ in errors):
            raise TransactionCanceledException(errors)
        for op_type, op, table_name, key in plan:
            names = op.get("ExpressionAttributeNames")
            values = op.get("ExpressionAttributeValues")
            if op_type == "Put":
                self.put_item(table_name, op["Item"])
            elif op_type == "Delete":
                self.delete_item(table_name, key)
            elif op_type == "Update":
                self.update_item(
                    table_name,
                    key,
                    update_expression=op["UpdateExpression"],
                    expression_attribute_names=names,
                    expression_attribute_values=values,
                )


DynamoDBBackend.transact_write_items = transact_write_items

if __name__ == "__main__":
    server.main(sys.argv[1:])
