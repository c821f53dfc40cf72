//! END_TRANSACTION: a producer's commit or rollback of a half message.

use super::{bad_request, store_failure};
use crate::broker::state::BrokerState;
use crate::broker::transaction::Decision;
use crate::remoting::header::EndTransactionRequestHeader;
use crate::remoting::message::sys_flag;
use crate::remoting::{RemotingCommand, ResponseCode};

pub async fn end_transaction(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<EndTransactionRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    let decision = match header.commit_or_rollback {
        sys_flag::TRANSACTION_COMMIT => Decision::Commit,
        sys_flag::TRANSACTION_ROLLBACK => Decision::Rollback,
        // Unknown: the producer does not know yet; a later check will ask again.
        _ => return RemotingCommand::response_to(request, ResponseCode::SUCCESS),
    };
    let Ok(commit_offset) = u64::try_from(header.commit_log_offset) else {
        return RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            "negative commitLogOffset",
        );
    };
    match state
        .transactions
        .end(&state.store, commit_offset, decision)
    {
        Ok(Some(put)) => {
            if let Err(error) = state.store.wait_durable(put.end).await {
                return store_failure(request, error);
            }
            state.arrivals.notify_all();
            RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        }
        Ok(None) => RemotingCommand::response_to(request, ResponseCode::SUCCESS),
        Err(error) => store_failure(request, error),
    }
}
