//! Answering UNIMPLEMENTED for capabilities a later release delivers: never a fake success.

/// The status for a capability that is not delivered yet.
pub fn not_yet(what: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!("{what} is not implemented in this release of ember"))
}

/// Writes one UNIMPLEMENTED method inside a `#[tonic::async_trait]` impl:
/// `not_yet!(method_name, RequestType, ResponseType, "what it does")`. It is spelled the way `async_trait`
/// expands an `async fn`, because `async_trait` does not see inside macro expansions.
#[macro_export]
macro_rules! not_yet {
    ($method:ident, $req:ty, $resp:ty, $what:literal) => {
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            _req: ::tonic::Request<$req>,
        ) -> ::std::pin::Pin<
            Box<
                dyn ::std::future::Future<Output = Result<::tonic::Response<$resp>, ::tonic::Status>>
                    + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move { Err($crate::stub::not_yet($what)) })
        }
    };
}
